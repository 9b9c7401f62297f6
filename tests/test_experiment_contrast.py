"""``dcn-fast experiment contrast``: --quick end to end, its sanity checks, and its errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dcn_fast.data import load_cifar10
from dcn_fast.experiments.contrast import QUICK, robust_integration
from dcn_fast.train import TrainConfig, eval_split, evaluate, load_model
from experiment_runs import run_error, run_quick, tiny_checkpoint


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One --quick run shared by the tests of this file (it trains DCN-ODE and ODE-Net one step)."""
    return run_quick("contrast", tmp_path_factory.mktemp("contrast"))


def test_quick_counts_every_contrast(quick):
    contrasts = quick["contrasts"]
    assert contrasts == QUICK["contrasts"] and 1.0 in contrasts
    assert [m["model"] for m in quick["models"]] == QUICK["models"]
    for model in quick["models"]:
        for mode in ("naive", "robust"):
            curve = model[mode]
            for key in ("acc", "loss", "nfe", "nfe_max", "nfe_blocks"):
                assert len(curve[key]) == len(contrasts), (model["model"], mode, key)
            assert all(isinstance(n, (int, float)) and n > 0 for n in curve["nfe"] + curve["nfe_max"])
            # Three ODE blocks, each counted; their sum is the total (one test batch in --quick).
            for total, blocks in zip(curve["nfe"], curve["nfe_blocks"]):
                assert len(blocks) == 3 and all(n > 0 for n in blocks) and sum(blocks) == pytest.approx(total)
            assert all(0 <= a <= 1 for a in curve["acc"])
        # T' = c·T reached block 1: an interval of 0.01·T takes fewer evaluations than T.
        assert model["robust"]["nfe_blocks"][0][0] < model["naive"]["nfe_blocks"][0][0]


def test_contrast_one_is_plain_evaluate(quick):
    """At c = 1, naive and robust are the unchanged model: equal to evaluate() without a transform."""
    data = load_cifar10(None)
    per_class = quick["test_images"] // 10
    images, labels = eval_split(data, TrainConfig(test_images_per_class=per_class))
    at = quick["contrasts"].index(1.0)
    for model in quick["models"]:
        net, config, _ = load_model(model["checkpoint"])
        plain = evaluate(net, images, labels, replace(config, eval_batch_size=quick["eval_batch_size"]))
        for mode in ("naive", "robust"):
            assert model[mode]["acc"][at] == plain["acc"], (model["model"], mode)
            assert model[mode]["loss"][at] == pytest.approx(plain["loss"], rel=1e-6)
            assert model[mode]["nfe"][at] == plain["nfe_forward_mean"]
            assert model[mode]["nfe_max"][at] == plain["nfe_forward"]
        assert model["T"] == [b.T for b in net.ode_blocks()]


def test_robust_integration_scales_and_restores(quick):
    net, _, _ = load_model(quick["models"][0]["checkpoint"])
    blocks = net.ode_blocks()
    trained = [b.T for b in blocks]
    x = torch.rand(1, 64, 15, 15)
    with torch.no_grad(), pytest.raises(RuntimeError, match="inside"):
        with robust_integration(net, 0.25, "all"):
            assert [b.T for b in blocks] == [0.25 * T for T in trained]
            inside = blocks[1](x)
            raise RuntimeError("an error inside the scope")
    assert [b.T for b in blocks] == trained
    assert not any(b._forward_pre_hooks for b in blocks)
    # The later block saw 0.25·x and integrated to 0.25·T.
    blocks[1].T = 0.25 * trained[1]
    with torch.no_grad():
        expected = blocks[1](0.25 * x)
    blocks[1].T = trained[1]
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    with robust_integration(net, 0.5):  # "first": block 1 only, no input scaling
        assert [b.T for b in blocks] == [0.5 * trained[0], *trained[1:]]
        assert not any(b._forward_pre_hooks for b in blocks)
    assert [b.T for b in blocks] == trained


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_contrast_out_of_range(value, tmp_path, capsys):
    err = run_error("contrast", capsys, "--out", str(tmp_path), "--contrasts", "0.1", value)
    assert "--contrasts" in err and "> 0" in err and "finite" in err
    assert not (tmp_path / "runs").exists()  # refused before any training


def test_checkpoint_of_a_model_without_ode_blocks(tmp_path, capsys):
    path = tiny_checkpoint("resnet-blocks", tmp_path / "resnet")
    err = run_error("contrast", capsys, "--out", str(tmp_path / "out"), "--checkpoint", str(path))
    assert "resnet-blocks" in err and "ODE blocks" in err and "dcn-ode" in err


def test_models_and_checkpoint_exclude_each_other(tmp_path, capsys):
    err = run_error("contrast", capsys, "--out", str(tmp_path), "--models", "odenet", "--checkpoint", "x.pt")
    assert "--models" in err and "--checkpoint" in err


def test_every_block_robust_from_checkpoints(quick, tmp_path):
    """--robust-blocks all on given checkpoints (one twice: the labels tell them apart)."""
    checkpoint = quick["models"][0]["checkpoint"]
    result = run_quick("contrast", tmp_path, "--checkpoint", checkpoint, checkpoint, "--contrasts", "0.05",
                       "--robust-blocks", "all")
    assert not (tmp_path / "runs").exists()  # nothing trained
    assert [m["label"] for m in result["models"]] == ["dcn-ode [1]", "dcn-ode [2]"]
    first, second = result["models"]
    assert first["naive"] == second["naive"] and first["robust"] == second["robust"]
    # Every block integrated 0.05·T: each takes fewer evaluations than over T.
    assert all(r < n for r, n in zip(first["robust"]["nfe_blocks"][0], first["naive"]["nfe_blocks"][0]))


def test_a_failed_solve_names_the_contrast(monkeypatch):
    from dcn_fast.experiments import contrast as contrast_module

    def failing(model, images, labels, config, c):
        raise FloatingPointError("the ODE solver's step size underflowed in ODE block 'stage1'")

    monkeypatch.setattr(contrast_module, "_measure", failing)
    with pytest.raises(FloatingPointError, match=r"at contrast c = 1e\+38: the ODE solver's step size underflowed"):
        contrast_module.contrast_curves(None, None, None, None, [1e38])
