"""``dcn-fast experiment completion``: the mask, D(t), the --quick run and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from dcn_fast.data import load_cifar10
from dcn_fast.experiments.completion import BlockStates, black, block_states, centre_patch, masker, total_difference
from dcn_fast.models import build
from dcn_fast.train import TrainConfig, eval_split, evaluate, load_model

from experiment_runs import run_error, run_quick


# -- the mask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 6, 7, 12, 14, 32])
def test_the_mask_zeroes_exactly_the_centre_patch(n):
    x = torch.rand(2, 3, 32, 32) + 0.1  # no zero anywhere before masking
    out = masker(n, torch.zeros(3))(x)
    zero = out == 0
    assert int(zero.sum()) == 2 * 3 * n * n
    rows, cols = centre_patch(n, 32, 32)
    assert bool(zero[:, :, rows, cols].all())
    assert rows.start == cols.start == (32 - n) // 2
    assert torch.equal(out[~zero], x[~zero])  # everything else untouched
    assert bool((x > 0).all())  # and the input itself was not modified


def test_the_official_14_patch_is_rows_and_columns_9_to_22():
    assert centre_patch(14, 32, 32) == (slice(9, 23), slice(9, 23))


def test_mask_zero_is_the_identity_and_the_fill_is_the_black_pixel():
    x = torch.rand(1, 3, 32, 32)
    assert masker(0, torch.zeros(3))(x) is x
    assert torch.equal(black(TrainConfig()), torch.zeros(3))
    fill = black(TrainConfig(normalize=True))  # black in standardised inputs: (0 - mean) / std < 0
    assert bool((fill < 0).all())
    out = masker(4, fill)(x)
    assert torch.equal(out[0, :, 14, 14], fill)


# -- D(t) -------------------------------------------------------------------------------------

def test_total_difference_is_the_sum_over_channels_and_pixels_over_their_number():
    a, b = torch.randn(5, 4, 3, 6, 7), torch.randn(5, 4, 3, 6, 7)
    expected = (a - b).abs().sum(dim=(-3, -2, -1)) / (3 * 6 * 7)
    d = total_difference(a, b)
    assert d.shape == (5, 4) and d.dtype == torch.float64
    torch.testing.assert_close(d, expected.double())
    assert bool((d > 0).all()) and float(total_difference(a, a).abs().max()) == 0.0


@pytest.fixture(scope="module")
def tiny_inputs():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16)  # small maps keep the ODE solves fast; the blocks do not mind
    return x, masker(6, torch.zeros(3))(x)


@pytest.mark.parametrize("name", ["odenet", "resnet-blocks", "dcn-ode"])
def test_block_by_block_states(name, tiny_inputs):
    torch.manual_seed(0)
    model = build(name, rtol=0.1, atol=0.1).eval()
    x, x_masked = tiny_inputs
    clean, again, masked = (block_states(model, v, 3) for v in (x, x, x_masked))
    assert [b.name for b in clean] == ["stage1", "stage2", "stage3"]
    for c, a, m in zip(clean, again, masked):
        assert isinstance(c, BlockStates)
        # No mask, no difference: the same input gives the same states, bit for bit.
        assert float(total_difference(c.states, a.states).abs().max()) == 0.0
        assert float(total_difference(c.states, m.states).min()) > 0
        if model.spec.stage == "ode":
            assert c.times.tolist() == pytest.approx([0.0, model.spec.T / 2, model.spec.T]) and c.nfe > 0
        else:
            assert c.times.tolist() == [0.0, 1.0] and c.nfe == 0
    with torch.no_grad():
        # D(0) of block 1 is the difference of the stem's outputs; the chain is the forward.
        torch.testing.assert_close(total_difference(clean[0].states[0], masked[0].states[0]),
                                   total_difference(model.stem(x), model.stem(x_masked)))
        torch.testing.assert_close(model.head(clean[-1].states[-1]), model(x), rtol=1e-5, atol=1e-5)


# -- the --quick run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("completion")
    return out, run_quick("completion", out)


def test_quick_run_writes_accuracy_and_difference(quick):
    _, result = quick
    models, masks = result["models"], result["masks"]
    assert models == ["dcn-ode", "odenet", "resnet-blocks"] and masks == [6, 12]
    assert len(result["figures"]) == 3
    for name in models:
        rows = [a for a in result["accuracy"] if a["model"] == name]
        assert [a["mask"] for a in rows] == [0, *masks] and all(0 <= a["acc"] <= 1 for a in rows)
        assert all((a["nfe_forward"] > 0) == (name != "resnet-blocks") for a in rows)
    a_of = {"stage1": 32 * 30 * 30, "stage2": 64 * 15 * 15, "stage3": 128 * 7 * 7}
    for d in result["difference"]:
        assert d["A"] == a_of[d["block"]]
        points = 2 if d["model"] == "resnet-blocks" else result["times"]
        assert len(d["times"]) == len(d["mean"]) == len(d["std"]) == points
        assert d["times"][0] == 0 and d["times"][-1] == {"dcn-ode": 2, "odenet": 1, "resnet-blocks": 1}[d["model"]]
        assert min(d["mean"]) > 0 and min(d["std"]) >= 0
        assert (d["nfe_clean"] > 0 and d["nfe_masked"] > 0) == (d["model"] != "resnet-blocks")
    assert len(result["difference"]) == len(models) * len(masks) * 3


def test_quick_unmasked_accuracy_is_the_plain_evaluation(quick):
    out, result = quick
    model, config, _ = load_model(out / "runs" / "odenet" / "best.pt")
    plain = evaluate(model, *eval_split(load_cifar10(None), config), config)
    row = next(a for a in result["accuracy"] if a["model"] == "odenet" and a["mask"] == 0)
    assert row["acc"] == plain["acc"] and row["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert result["test_images"] == 20  # --quick: 2 test images per class


# -- one-line errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--masks", "6", "33"], "--masks must be in 1..32"),
    (["--masks", "0"], "--masks must be in 1..32"),
    (["--times", "1"], "--times (points of the time grid of each block) must be in 2..1001, got 1"),
    (["--images", "0"], "--images must be in 1..500"),
    (["--quick", "--images", "21"], "--images must be in 1..20"),
])
def test_settings_out_of_range(args, message, tmp_path, capsys):
    assert message in run_error("completion", capsys, "--out", str(tmp_path / "out"), *args)
    assert not (tmp_path / "out").exists()  # checked before anything is trained


def test_models_and_checkpoints_exclude_each_other(quick, tmp_path, capsys):
    out, _ = quick
    err = run_error("completion", capsys, "--out", str(tmp_path), "--models", "odenet",
                    "--checkpoint", str(out / "runs" / "dcn-ode" / "best.pt"))
    assert "--models and --checkpoint exclude each other" in err


def test_checkpoint_that_is_not_one(quick, tmp_path, capsys):
    out, _ = quick
    err = run_error("completion", capsys, "--out", str(tmp_path), "--checkpoint", str(out / "result.json"))
    assert "is not a readable dcn_fast checkpoint" in err


def test_quick_run_from_a_checkpoint_trains_nothing(quick, tmp_path):
    out, _ = quick
    path = str(out / "runs" / "resnet-blocks" / "best.pt")
    result = run_quick("completion", tmp_path, "--checkpoint", path, path, "--masks", "4", "--images", "2")
    # Two checkpoints of one model are told apart by their place in the list.
    assert result["models"] == ["resnet-blocks [1]", "resnet-blocks [2]"] and result["masks"] == [4]
    assert not (tmp_path / "runs").exists()
