"""``dcn-fast experiment scales``: --quick end to end, its sanity checks, and its errors."""

from __future__ import annotations

import pytest

from dcn_fast.experiments.scales import DEFAULTS, layer_label
from dcn_fast.modules import SRFConv2d
from dcn_fast.ode import TAU, TimeConv
from dcn_fast.train import load_model
from experiment_runs import run_error, run_quick, tiny_checkpoint


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One --quick run shared by the tests of this file (DCN-ODE, σ^ji, σ(t) trained one step)."""
    result = run_quick("scales", tmp_path_factory.mktemp("scales"))
    assert [m["model"] for m in result["models"]] == DEFAULTS["models"]
    assert sorted(result["figures"]) == ["sigma_ji_histograms.png", "sigma_per_layer.png", "sigma_t.png"]
    return {m["model"]: m for m in result["models"]}


def _srf_layers(net) -> dict[str, SRFConv2d]:
    return {name: m for name, m in net.named_modules() if isinstance(m, SRFConv2d)}


@pytest.mark.parametrize("model", DEFAULTS["models"])
def test_sigma_is_two_to_the_scale(quick, model):
    record = quick[model]
    layers = _srf_layers(load_model(record["checkpoint"])[0])
    assert [layer["name"] for layer in record["layers"]] == list(layers)  # all six, in network order
    for layer in record["layers"]:
        sigma = (2.0 ** layers[layer["name"]].scale.detach()).double()
        assert layer["label"] == layer_label(layer["name"]) and layer["label"].startswith(layer["block"] + ".conv")
        if "sigma" in layer:
            assert sigma.numel() == 1 and layer["sigma"] == float(sigma)
        else:
            stats = layer["stats"]
            assert stats["n"] == sigma.numel() > 1
            assert stats["min"] == float(sigma.min()) and stats["max"] == float(sigma.max())
            assert stats["mean"] == pytest.approx(float(sigma.mean()), rel=1e-12)
            assert stats["min"] < stats["median"] < stats["max"]


def test_sigma_ji_histograms_count_every_pair(quick):
    record = quick["dcn-sigma-ji"]
    layers = _srf_layers(load_model(record["checkpoint"])[0])
    assert list(record["sigma_ji"]) == ["stage1", "stage2", "stage3"]
    for (block, h), channels in zip(record["sigma_ji"].items(), (32, 64, 128)):
        pairs = sum(m.scale.numel() for name, m in layers.items() if name.startswith(block + "."))
        # Two convolutions of C + 1 inputs (the time channel's pairs too) and C outputs.
        assert sum(h["counts"]) == h["n"] == pairs == 2 * channels * (channels + 1)
        assert len(h["sigma_edges"]) == len(h["counts"]) + 1
        assert h["sigma_edges"][0] <= h["min"] and h["max"] <= h["sigma_edges"][-1]
        assert sum(c > 0 for c in h["counts"]) > 5  # learned (initialised) σ^ji spread over many bins
    assert quick["dcn-ode"]["sigma_ji"] == {} and quick["dcn-sigma-t"]["sigma_ji"] == {}


def test_sigma_t_follows_the_layers_law(quick):
    record = quick["dcn-sigma-t"]
    net = load_model(record["checkpoint"])[0]
    convs = {layer_label(name): m for name, m in net.named_modules() if isinstance(m, TimeConv)}
    assert sorted(record["sigma_t"]) == sorted(convs) and len(convs) == 6
    for label, curve in record["sigma_t"].items():
        conv = convs[label]
        T = net.get_submodule(curve["block"]).T
        assert curve["t"][0] == 0 and curve["t"][-1] == pytest.approx(T) and len(curve["t"]) == len(curve["sigma"])
        # s = 0 at t = 0: σ(0) is the layer's own σ.
        assert curve["sigma"][0] == float(2.0 ** conv.layer.scale.detach())
        # At t = T (inside the clip range [-0.5, 2.5]) s = τ·T: the paper's σ = 2^(a·s + b).
        expected = 2.0 ** (conv.layer.scale.detach().double() + conv.scale_t.detach().double() * TAU * T)
        assert curve["sigma"][-1] == pytest.approx(float(expected), rel=1e-5)
    assert quick["dcn-ode"]["sigma_t"] == {} and quick["dcn-sigma-ji"]["sigma_t"] == {}


@pytest.mark.parametrize("model", ["resnet-blocks"])
def test_checkpoint_of_a_model_without_srf_layers(model, tmp_path, capsys):
    path = tiny_checkpoint(model, tmp_path / model)
    err = run_error("scales", capsys, "--out", str(tmp_path / "out"), "--checkpoint", str(path))
    assert model in err and "SRF layers" in err and "dcn-ode" in err


def test_models_and_checkpoint_exclude_each_other(tmp_path, capsys):
    err = run_error("scales", capsys, "--out", str(tmp_path), "--models", "dcn-ode", "--checkpoint", "x.pt")
    assert "--models" in err and "--checkpoint" in err


def test_training_options_with_checkpoints_are_refused(tmp_path, capsys):
    """With --checkpoint nothing is trained: --epochs / --lr would be recorded but have no effect."""
    err = run_error("scales", capsys, "--out", str(tmp_path), "--checkpoint", "x.pt", "--epochs", "5", "--lr", "3")
    assert "--epochs, --lr: training options, but with --checkpoint scales trains nothing" in err
