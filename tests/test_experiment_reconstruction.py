"""``dcn-fast experiment reconstruction``: the --quick run, the decoder's pieces, resuming, bad input."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dcn_fast.data import load_cifar10
from dcn_fast.experiments import reconstruction as rec
from dcn_fast.models import build
from dcn_fast.ode import ODEBlock, TimeConv
from dcn_fast.train import TrainConfig

from experiment_runs import run_error, run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run (dcn-ode, odenet, resnet-blocks) shared by the checks below: (out folder, result.json)."""
    out = tmp_path_factory.mktemp("reconstruction") / "out"
    return out, run_quick("reconstruction", out)


def test_quick_run_writes_plausible_results(quick):
    out, result = quick
    assert [row["model"] for row in result["models"]] == rec.MODELS_COMPARED == ["dcn-ode", "odenet", "resnet-blocks"]
    assert result["figures"] == ["reconstructions.png", "decoder_curves.png"]
    assert all((out / name).stat().st_size < 200_000 for name in result["figures"])
    # Pixels in [0, 1]: any MSE lies in (0, 1); the mean image is a real, non-zero reference.
    assert 0 < result["baseline_mean_image_mse"] < 0.25
    for row in result["models"]:
        mse = row["test_mse"]
        assert math.isfinite(mse) and 0 < mse < 1
        assert row["epochs"] == rec.QUICK["decoder_epochs"] == len(row["history"])
        assert mse == min(h["test_mse"] for h in row["history"]) == row["history"][row["best_epoch"] - 1]["test_mse"]
        assert row["official_printout"] == pytest.approx(10 * mse)
        assert row["test_sse_per_image"] == pytest.approx(3 * 28 * 28 * mse)
        assert all(math.isfinite(h["train_loss"]) and 0 < h["train_loss"] < 1 for h in row["history"])
        if row["model"] == "resnet-blocks":
            assert row["nfe_decoder"] is row["nfe_encoder"] is None
        else:  # both decoder blocks (all 3 encoder ones) are ODE blocks that ran: 7+ evaluations each
            assert row["nfe_decoder"] >= 14 and row["nfe_encoder"] >= 21
        assert row["encoder_checkpoint"] == str((out / "runs" / row["model"] / "best.pt").resolve())
        assert (out / "decoders" / row["model"] / "last.pt").is_file()
        assert row["paper"] == rec.PAPER.get(row["model"])


def test_rerun_reuses_the_classifier_and_the_decoder(quick, tmp_path, capsys):
    """A moved run folder, run again: nothing retrained; more decoder epochs there are refused
    (the learning-rate drops of a longer run fall elsewhere)."""
    out = tmp_path / "moved"
    shutil.copytree(quick[0], out)
    before = next(row for row in quick[1]["models"] if row["model"] == "odenet")
    capsys.readouterr()
    result = run_quick("reconstruction", out, "--models", "odenet")
    log = capsys.readouterr().out
    assert log.count("continuing the training there") == 2 and "epoch 1/" not in log
    (row,) = result["models"]
    assert row["history"] == before["history"]
    err = run_error("reconstruction", capsys, "--quick", "--out", str(out), "--models", "odenet",
                    "--decoder-epochs", "3")
    assert "decoders/odenet holds a training started with other settings (--epochs 2 -> 3)" in err


def _sample(n: int) -> torch.Tensor:
    return load_cifar10().train_images[:n]


def test_decoder_learns_and_leaves_the_encoder_alone():
    """Ten decoder steps on 16 images lower their MSE by a tenth or more; the encoder's weights do not move."""
    images = _sample(16)
    config = TrainConfig(model="resnet-blocks", batch_size=16)
    encoder = build("resnet-blocks").eval().requires_grad_(False)
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    decoder = rec.build_decoder(encoder, config)
    # The decoder starts from the classifier's trained blocks, as copies (no shared storage).
    for mine, theirs in ((decoder.block3, encoder.stage3), (decoder.block2, encoder.stage2)):
        for (name, p), q in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    start = {k: v.clone() for k, v in decoder.state_dict().items()}
    optimizer = torch.optim.SGD(decoder.parameters(), lr=config.lr, momentum=config.momentum)
    features, nfe = rec.encode(encoder, images, config)
    assert features.shape == (16, 128, 7, 7) and nfe is None  # a ResNet has no ODE block
    target = rec.targets(images)
    shown = torch.tensor([3, 0])
    untrained = rec.evaluate_decoder(decoder, features, target, config, shown)
    for epoch in range(10):
        rec.train_decoder_epoch(encoder, decoder, optimizer, images, config, epoch)
    trained = rec.evaluate_decoder(decoder, features, target, config, shown)
    assert trained["test_mse"] < 0.9 * untrained["test_mse"]
    assert trained["shown"].shape == (2, 3, 28, 28)
    assert all(torch.equal(v, frozen[k]) for k, v in encoder.state_dict().items())
    assert not torch.equal(decoder.block3.conv1.weight, start["block3.conv1.weight"])


@pytest.mark.parametrize("model, kind, T", [("odenet", "conv", 1.0), ("dcn-ode", "srf", 2.0)])
def test_decoder_blocks_are_the_encoders_kind_with_the_runs_solver(model, kind, T):
    encoder = build(model, rtol=1e-3, atol=1e-3, gradient="adjoint")
    config = TrainConfig(model=model, rtol=0.1, atol=0.2, gradient="backprop")
    decoder = rec.build_decoder(encoder, config)
    assert len(decoder.ode_blocks()) == 2
    for block in decoder.ode_blocks():
        assert isinstance(block, ODEBlock) and (block.T, block.rtol, block.atol, block.gradient) == (T, 0.1, 0.2,
                                                                                                   "backprop")
        assert {m.kind for m in block.modules() if isinstance(m, TimeConv)} == {kind}
    if model == "odenet":  # the cheap one: the shapes through the whole decoder
        assert decoder(torch.randn(2, 128, 7, 7)).shape == (2, 3, 28, 28)


def test_rescale_spans_the_batch():
    x = torch.tensor([[-2.0, 0.0], [1.0, 2.0]])
    assert torch.equal(rec.rescale(x), torch.tensor([[0.0, 0.5], [0.75, 1.0]]))
    assert torch.equal(rec.rescale(torch.full((2, 2), 3.0)), torch.zeros(2, 2))  # no 0/0


def test_bad_input_is_one_line(quick, tmp_path, capsys):
    out, _ = quick
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert "--decoder-epochs must be in 1..10000, got 0" in run_error("reconstruction", capsys, "--decoder-epochs",
                                                                      "0", "--out", str(tmp_path / "a"))
    assert "--models and --checkpoint exclude each other" in run_error("reconstruction", capsys, "--models", "odenet",
                                                                       "--checkpoint", str(text))
    assert "does not exist" in run_error("reconstruction", capsys, "--checkpoint", str(tmp_path / "none.pt"))
    assert "not a readable dcn_fast checkpoint" in run_error("reconstruction", capsys, "--checkpoint", str(text))
    # A decoder's checkpoint is no classifier.
    decoder = out / "decoders" / "odenet" / "best.pt"
    assert "do not fit model 'odenet'" in run_error("reconstruction", capsys, "--checkpoint", str(decoder))


def test_a_decoder_folder_is_not_reused_for_another_encoder(quick, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(quick[0], out)
    ckpt = torch.load(out / "runs" / "odenet" / "best.pt", weights_only=True)
    ckpt["model_state"]["head.4.bias"] += 1.0  # another classifier of the same model
    torch.save(ckpt, tmp_path / "other.pt")
    err = run_error("reconstruction", capsys, "--quick", "--out", str(out), "--checkpoint", str(tmp_path / "other.pt"))
    assert "holds a decoder trained on another classifier" in err
