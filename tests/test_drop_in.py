"""fit_srf, SRFConv2d.from_conv2d, convert_model, export_model and the example (issue #19)."""

import importlib.util
import io
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from dcn_fast import SRFConv2d, convert_model, export_model, fit_srf, format_report, srf_taps
from dcn_fast.basis import basis_from_taps
from dcn_fast.fit import filter_error
from dcn_fast.modules import UnsupportedConvError
from dcn_fast.ode import TimeConv

from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]


def srf_bank(sharing, order, kernel_size, c_out=3, c_in=2, groups=1):
    """An SRFConv2d (float64) with σ spread over [0.6, 2] and its dense filters."""
    layer = SRFConv2d(c_in, c_out, order=order, scale_sharing=sharing, kernel_size=kernel_size, groups=groups).double()
    with torch.no_grad():
        layer.scale.uniform_(-0.7, 1.0)
    return layer, layer.filters().detach()


# --- fit_srf -------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", range(5))
@pytest.mark.parametrize("sharing, kernel_size", [("layer", 7), ("channel", 7), ("pair", 7), ("layer", None), ("channel", None)])
def test_fit_recovers_filters_in_the_basis(sharing, kernel_size, order):
    layer, weight = srf_bank(sharing, order, kernel_size)
    fit = fit_srf(weight, order=order, scale_sharing=sharing, kernel_size="conv" if kernel_size else None)
    assert fit.scale.shape == layer.scale.shape and fit.alpha.shape == layer.alpha.shape
    sigma = layer.sigma
    assert float(((2.0**fit.scale - sigma) / sigma).abs().max()) < 1e-6
    assert rel_err(fit.alpha, layer.alpha) < 1e-8
    assert float(fit.error.max()) < 1e-8 and fit.kernel_size == kernel_size


def test_fit_with_groups_and_another_fixed_size():
    layer, weight = srf_bank("channel", 2, 5, c_out=4, c_in=4, groups=2)
    fit = fit_srf(weight, order=2, scale_sharing="channel")
    assert rel_err(2.0**fit.scale, layer.sigma) < 1e-6 and rel_err(fit.alpha, layer.alpha) < 1e-8
    # A 7x7 support for 5x5 filters: the fit sees the 5x5 weight zero-padded.
    wider = fit_srf(weight, order=2, kernel_size=7)
    assert wider.kernel_size == 7 and float(wider.error.max()) < 1.0


def best_on_grid(weight, order, sharing, low, high, points):
    """Σ of squared residuals at the best σ of a grid, by plain lstsq per σ (the oracle)."""
    c_out, c_in, k, _ = weight.shape
    grid = torch.linspace(low, high, points, dtype=torch.float64)
    basis = basis_from_taps(srf_taps(grid, order, k // 2, None), order).flatten(-2).mT  # [G, K², F]
    targets = weight.reshape(-1, k * k).mT
    solution = torch.linalg.lstsq(basis, targets.expand(points, -1, -1), driver="gelsd").solution
    residual = (basis @ solution - targets).square().sum(1).reshape(points, c_out, c_in)
    if sharing == "layer":
        return residual.sum((1, 2)).min()
    if sharing == "channel":
        return residual.sum(2).min(0).values.sum()
    return residual.min(0).values.sum()


@pytest.mark.parametrize("order", [0, 2, 4])
@pytest.mark.parametrize("sharing", ["layer", "channel", "pair"])
@pytest.mark.parametrize("k", [3, 5])
def test_fit_of_random_filters_is_never_worse_than_a_fine_grid(sharing, order, k):
    weight = torch.randn(5, 3, k, k, dtype=torch.float64)
    fit = fit_srf(weight, order=order, scale_sharing=sharing)
    fitted = (fit.error**2 * weight.flatten(1).square().sum(1)).sum()
    # The fit's own grid has step 1/8; the oracle's 1/64, on the same default range.
    oracle = best_on_grid(weight, order, sharing, -2.0, math.log2(k), int(64 * (math.log2(k) + 2)) + 1)
    assert fitted <= oracle * (1 + 1e-9) + 1e-12
    assert bool(((fit.scale >= -2.0) & (fit.scale <= math.log2(k))).all())


def test_fit_rank_deficient_basis_and_error_definition():
    # F = 15 basis functions on 3x3 = 9 taps: (nearly) any filter fits; α is the minimum-norm one.
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    fit = fit_srf(weight, order=4)
    assert float(fit.error.max()) < 1e-10 and torch.isfinite(fit.alpha).all()
    # filter_error: per output channel, on the larger support; a zero target with a zero fit is 0.
    target = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    target[0, 0, 1, 1] = 2.0
    approx = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    approx[0, 0, 2, 2], approx[0, 0, 0, 0] = 2.0, 1.0
    torch.testing.assert_close(filter_error(approx, target), torch.tensor([0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "weight, kwargs, match",
    [
        (torch.randn(2, 2, 4, 4), {}, "odd K"),
        (torch.randn(2, 2, 3), {}, "odd K"),
        (torch.full((2, 2, 3, 3), math.nan), {}, "finite"),
        (torch.randn(2, 2, 3, 3), dict(order=-1), "order"),
        (torch.randn(2, 2, 3, 3), dict(scale_sharing="pixel"), "scale_sharing"),
        (torch.randn(2, 2, 3, 3), dict(kernel_size=4), "kernel_size"),
        (torch.randn(2, 2, 3, 3), dict(kernel_size=None, scale_sharing="pair"), "pair"),
        (torch.randn(2, 2, 3, 3), dict(scale_range=(1.0, 0.0)), "scale_range"),
        (torch.randn(2, 2, 3, 3), dict(scale_range=(-9.0, 0.0)), "-8"),
        (torch.randn(2, 2, 3, 3), dict(kernel_size=None, scale_range=(0.0, 6.0)), "cap"),
        (torch.randn(2, 2, 3, 3), dict(grid_step=0), "grid_step"),
        (torch.randn(2, 2, 3, 3), dict(starts=0), "starts"),
        (torch.randn(2, 2, 3, 3), dict(tol=0), "tol"),
    ],
)
def test_fit_rejects_bad_input(weight, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_srf(weight, **kwargs)
    with pytest.raises(TypeError, match="weight"):
        fit_srf(torch.ones(2, 2, 3, 3, dtype=torch.int64))


# --- SRFConv2d.from_conv2d ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv, kwargs",
    [
        (nn.Conv2d(3, 8, 3, padding=1), {}),
        (nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), {}),
        (nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(0, 1), groups=2), dict(scale_sharing="pair")),
        (nn.Conv2d(3, 5, 5, padding="same"), dict(scale_sharing="channel", order=3)),
        (nn.Conv2d(3, 5, 5, padding="valid"), {}),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), dict(kernel_size=None)),
        (nn.Conv2d(3, 5, 3, padding=1), dict(kernel_size=5)),
        (nn.Conv2d(3, 5, 5, padding=2), dict(kernel_size=3)),
    ],
)
def test_from_conv2d_keeps_the_geometry(conv, kwargs):
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    srf = SRFConv2d.from_conv2d(conv, **kwargs)
    x = torch.randn(2, conv.in_channels, 11, 12)
    out = srf(x)
    assert out.shape == conv(x).shape and torch.isfinite(out).all()
    assert (srf.in_channels, srf.out_channels, srf.groups, srf.stride) == (
        conv.in_channels, conv.out_channels, conv.groups, conv.stride
    )
    assert srf.alpha.dtype == conv.weight.dtype and srf.fit_error.shape == (conv.out_channels,)
    if conv.bias is not None:
        torch.testing.assert_close(srf.bias, conv.bias, rtol=0, atol=0)
    # The fit is what the layer computes: its filters against the conv's weight.
    torch.testing.assert_close(srf.fit_error, filter_error(srf.filters(), conv.weight))


@pytest.mark.parametrize("kwargs", [dict(), dict(scale_sharing="channel", order=3), dict(scale_sharing="pair")])
def test_from_conv2d_of_an_srf_filter_reproduces_the_conv(kwargs):
    """SRF → nn.Conv2d → SRF: the same σ, α and outputs (float64)."""
    original = SRFConv2d(3, 4, kernel_size=5, padding=(2, 2), stride=2, bias=True, **kwargs).double()
    with torch.no_grad():
        original.scale.uniform_(-0.5, 0.8)
        original.bias.normal_()
    conv = original.to_conv2d()
    srf = SRFConv2d.from_conv2d(conv, **kwargs)
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    torch.testing.assert_close(srf(x), conv(x), rtol=1e-9, atol=1e-10)
    assert rel_err(srf.sigma, original.sigma) < 1e-6 and float(srf.fit_error.max()) < 1e-8
    assert not srf.alpha.requires_grad and not srf.scale.requires_grad  # the conv was frozen


def test_from_conv2d_without_fit_and_training_mode():
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    srf = SRFConv2d.from_conv2d(conv, fit=False, init_scale=0.5, learn_scale=False)
    assert srf.fit_error is None and not srf.training and float(srf.scale) == 0.5
    assert srf.alpha.requires_grad and not srf.scale.requires_grad
    with pytest.raises(ValueError, match="need fit=True"):
        SRFConv2d.from_conv2d(conv, fit=False, tol=1e-3)


@pytest.mark.parametrize(
    "conv, kwargs, error, match",
    [
        (nn.Conv3d(2, 2, 3), {}, TypeError, "got Conv3d"),
        (nn.ConvTranspose2d(2, 2, 3), {}, TypeError, "transposed"),
        (nn.Linear(2, 2), {}, TypeError, "not a convolution"),
        (nn.Conv2d(2, 2, 3, dilation=2), {}, UnsupportedConvError, r"conv.dilation must be 1.*\(2, 2\)"),
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), {}, UnsupportedConvError, "padding_mode"),
        (nn.Conv2d(2, 2, 4), {}, UnsupportedConvError, r"square and odd.*\(4, 4\)"),
        (nn.Conv2d(2, 2, (1, 3)), {}, UnsupportedConvError, "square and odd"),
        (nn.LazyConv2d(2, 3), {}, UnsupportedConvError, "lazy"),
        (nn.Conv2d(2, 2, 3, padding=0), dict(kernel_size=None), UnsupportedConvError, "K//2"),
        (nn.Conv2d(2, 2, 5, padding=0), dict(kernel_size=3), UnsupportedConvError, "smallest fixed size is 5"),
        (nn.Conv2d(2, 2, 3), dict(kernel_size=4), ValueError, "kernel_size"),
        (nn.Conv2d(2, 2, 3), dict(order=-1), ValueError, "order"),
        (nn.Conv2d(2, 2, 3, padding=1), dict(kernel_size=None, scale_sharing="pair"), ValueError, "pair"),
        (nn.Conv2d(2, 2, 3, device="meta"), {}, ValueError, "meta device.*fit=False"),
        (nn.Conv2d(2, 2, 3), dict(fit="no"), TypeError, "fit must be True or False, got 'no'"),
        (nn.Conv2d(2, 2, 3), dict(learn_scale="no"), TypeError, "learn_scale must be True or False"),
    ],
)
def test_from_conv2d_rejects_what_it_cannot_express(conv, kwargs, error, match):
    with pytest.raises(error, match=match):
        SRFConv2d.from_conv2d(conv, **kwargs)


def test_a_meta_conv_converts_without_fit_and_fit_srf_names_the_dtype():
    srf = SRFConv2d.from_conv2d(nn.Conv2d(2, 2, 3, device="meta"), fit=False)
    assert srf.alpha.is_meta
    with pytest.raises(TypeError, match="got a torch.int64 tensor"):
        fit_srf(torch.ones(2, 2, 3, 3, dtype=torch.long))


# --- convert_model --------------------------------------------------------------------------------


class Net(nn.Module):
    """A bit of everything: 3x3, strided 5x5, 1x1, dilated, transposed, a shared conv, BN, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 5, stride=2, padding=2, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(torch.relu(self.bn(self.stem(x))))
        x = self.up(self.dilated(x))
        x = self.shared(self.shared(x))
        return self.head(x.mean((2, 3)))


def test_convert_model_replaces_what_it_can_and_reports_the_rest():
    net = Net()
    x = torch.randn(2, 3, 12, 12)
    expected_shape = net(x).shape
    rows = []
    copy = convert_model(net, inplace=False, report=rows)
    assert type(net.stem) is nn.Conv2d  # the original is untouched
    kinds = {name: type(m).__name__ for name, m in copy.named_children()}
    assert kinds["stem"] == kinds["shared"] == "SRFConv2d" and type(copy.body[0]) is SRFConv2d
    assert type(copy.body[2]) is nn.Conv2d and kinds["dilated"] == "Conv2d" and kinds["up"] == "ConvTranspose2d"
    assert kinds["bn"] == "BatchNorm2d" and kinds["head"] == "Linear"
    by_name = {r.name: r for r in rows}
    assert [n for n, r in by_name.items() if r.replaced] == ["stem", "body.0", "shared"]
    assert "min_kernel_size=3" in by_name["body.2"].reason
    assert "dilation" in by_name["dilated"].reason and "transposed" in by_name["up"].reason
    assert by_name["stem"].parameters == (8 * 3 * 9 + 8, 6 * 3 * 8 + 1 + 8)
    assert 0 <= by_name["body.0"].max_error < 1.5 and by_name["body.0"].fit_error.shape == (8,)
    assert "3 of 6 convolutions replaced" in format_report(rows)
    # Trains: finite outputs and gradients everywhere.
    out = copy(x)
    assert out.shape == expected_shape and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in copy.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert copy.shared.scale.grad.abs().sum() > 0


def test_convert_model_selection():
    net = Net()
    assert convert_model(Net(), include="body").stem.__class__ is nn.Conv2d
    only = convert_model(Net(), include=["body.*", "shared"])
    assert type(only.body[0]) is SRFConv2d and type(only.shared) is SRFConv2d and type(only.stem) is nn.Conv2d
    kept = convert_model(Net(), exclude="stem", min_kernel_size=1)
    assert type(kept.stem) is nn.Conv2d and type(kept.body[2]) is SRFConv2d  # 1x1 taken with min_kernel_size=1
    by_callable = convert_model(Net(), include=lambda name, m: m.out_channels == 4)
    assert type(by_callable.shared) is SRFConv2d and type(by_callable.stem) is nn.Conv2d
    for selector in ("include", "exclude"):
        with pytest.raises(ValueError, match=rf"{selector} pattern 'layer9' matched no nn.Conv2d.*stem, body.0"):
            convert_model(net, **{selector: "layer9"})
    with pytest.raises(ValueError, match=r"matched only up \(ConvTranspose2d\)"):
        convert_model(net, include="up")
    with pytest.raises(ValueError, match="cannot convert dilated: conv.dilation"):
        convert_model(net, strict=True)
    with pytest.raises(ValueError, match="min_kernel_size"):
        convert_model(net, min_kernel_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        convert_model(net, ordr=2)
    with pytest.raises(ValueError, match="order"):
        convert_model(net, order=-1)
    assert all(type(m) is not SRFConv2d for m in net.modules())  # nothing changed by the failed calls


def test_convert_model_keeps_shared_modules_shared_and_converts_a_bare_conv():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    convert_model(net)
    assert type(net[0]) is SRFConv2d and net[0] is net[2]
    assert type(convert_model(nn.Conv2d(3, 4, 3))) is SRFConv2d


def test_converted_model_saves_and_loads():
    net = convert_model(Net(), scale_sharing="channel")
    x = torch.randn(2, 3, 12, 12)
    net.eval()
    expected = net(x)
    fresh = convert_model(Net(), scale_sharing="channel", fit=False).eval()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), expected)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected)


# --- export_model ---------------------------------------------------------------------------------


def exported_pair():
    """A converted Net (σ moved by hand, as training would) and its export."""
    net = convert_model(Net(), scale_sharing="channel").eval()
    with torch.no_grad():
        net.stem.scale.add_(0.1)
    return net, export_model(net, inplace=False)


def test_export_model_equals_the_srf_model_and_needs_no_dcn_fast():
    net, plain = exported_pair()
    x = torch.randn(2, 3, 12, 12)
    assert rel_err(plain(x), net(x)) < 1e-5
    assert not any(type(m).__module__.startswith("dcn_fast") for m in plain.modules())
    assert b"dcn_fast" not in pickle.dumps(plain)
    assert type(plain.stem) is nn.Conv2d and not plain.stem.weight.requires_grad and not plain.stem.training
    assert any(isinstance(m, SRFConv2d) for m in net.modules())  # inplace=False
    assert type(export_model(SRFConv2d(3, 4))) is nn.Conv2d


def test_export_model_refuses_ode_block_layers():
    net = nn.Sequential(TimeConv(3, 4), SRFConv2d(4, 4))
    with pytest.raises(ValueError, match=r"driven by an ODE block's TimeConv.*0\.layer"):
        export_model(net)
    assert type(net[1]) is SRFConv2d  # unchanged
    export_model(net, strict=False)
    assert type(net[0].layer) is SRFConv2d and type(net[1]) is nn.Conv2d


def test_exported_model_runs_under_torch_export():
    net, plain = exported_pair()
    x = torch.randn(2, 3, 12, 12)
    program = torch.export.export(plain, (x,))
    assert rel_err(program.module()(x), net(x)) < 1e-5


def test_exported_model_exports_to_onnx():
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[test]' brings it)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript")
    from onnx.reference import ReferenceEvaluator

    net, plain = exported_pair()
    x = torch.randn(2, 3, 12, 12)
    model = torch.onnx.export(plain, (x,), dynamo=True).model_proto
    onnx.checker.check_model(model)
    session = ReferenceEvaluator(model)
    (out,) = session.run(None, {session.input_names[0]: x.numpy()})
    assert rel_err(torch.from_numpy(out), net(x)) < 1e-5


# --- the example ----------------------------------------------------------------------------------


def test_example_convert_resnet_runs():
    pytest.importorskip("torchvision", reason="the example converts a torchvision ResNet-18")
    spec = importlib.util.spec_from_file_location("convert_resnet", ROOT / "examples" / "convert_resnet.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--size", "32", "--batch", "8"])
    assert results["parameters_before"] == 11_181_642 and results["parameters_after"] == 7_511_579
    assert results["replaced"] == 17 and results["exported_srf_layers"] == 0
    assert math.isfinite(results["loss"]) and results["export_max_difference"] < 1e-4
    assert 0 < results["fit_error_mean"] < 1
    errors = results["gabor_errors"]
    assert all(errors[n][0] >= errors[n][1] - 1e-9 for n in errors)  # one σ per channel fits at least as well
    assert errors[4][1] < errors[2][1] < errors[0][1]  # higher orders fit better
