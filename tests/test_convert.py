"""Official checkpoints → dcn_fast: key mapping, σ^ji transposition, the CLI's errors.

The official models are rebuilt with the official module structure (bench/published.py),
so their state dicts carry the official key names; converted, they must give our models
the same outputs as the official forward.
"""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after tests/: its conftest stays the one imported
from published import OfficialSrfInd, official_model  # noqa: E402

from dcn_fast import SRFConv2d, cli  # noqa: E402
from dcn_fast.convert import convert_state_dict, main  # noqa: E402
from dcn_fast.data import load_cifar10, to_inputs  # noqa: E402
from dcn_fast.models import MODELS, build  # noqa: E402
from dcn_fast.train import load_model  # noqa: E402


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_official_model_computes_what_the_official_one_does(name):
    """Same weights, same forward: fixed-step RK4 (evaluations at t = 0, 2/3, 4/3, 2) keeps it fast."""
    torch.manual_seed(0)
    official = official_model(name, method="rk4").double()
    T = 2.0 if MODELS[name].stage == "ode" else None  # the official scripts integrate to 2
    ours = build(name, T=T, method="rk4", gradient="backprop").double()
    ours.load_state_dict(convert_state_dict(official.state_dict(), name))
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-9, atol=1e-11)


def test_published_sigma_ji_layer_state_dict_loads_transposed():
    """Srf_layer_ind stores scales [C_in, C_out]; SRFConv2d transposes them on load."""
    official = OfficialSrfInd(3, 5).double()
    layer = SRFConv2d(3, 5, scale_sharing="pair", kernel_size=7).double()
    layer.load_state_dict(official.state_dict())
    torch.testing.assert_close(layer.scale.detach(), official.scales.detach().t())
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), official(x), rtol=1e-10, atol=1e-12)


def test_wrong_model_is_refused_with_the_keys_that_differ():
    state = official_model("dcn-sigma-t").state_dict()
    with pytest.raises(ValueError, match=r"not an official dcn-ode checkpoint \(unexpected: stage1\.func\.conv1\.layer\.scale_bias"):
        convert_state_dict(state, "dcn-ode")
    pair = official_model("dcn-sigma-ji").state_dict()
    with pytest.raises(ValueError, match=r"wrong shape: stage1\.func\.conv1\.layer\.scale \(33, 32\) \(expected \(1,\)\)"):
        convert_state_dict(pair, "dcn-ode")
    with pytest.raises(ValueError, match="unknown model 'dcn'"):
        convert_state_dict(pair, "dcn")


def test_cli_converts_an_official_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    official = official_model("dcn-ode")
    path = tmp_path / "model_seed_5.pth"
    torch.save({"state_dict": official.state_dict(), "args": argparse.Namespace(lr=0.1, tol=1e-3)}, path)
    out = tmp_path / "dcn-ode.pt"
    assert main([str(path), str(out), "--model", "dcn-ode"]) == 0
    model, config, _ = load_model(out)
    torch.testing.assert_close(model.stage2.func.conv2.layer.alpha, official[5].odefunc.conv2._layer.alphas)
    assert config.model == "dcn-ode" and "wrote" in capsys.readouterr().out


def test_dcn_fast_eval_reads_a_converted_checkpoint(tmp_path, capsys):
    """The converted file is a checkpoint: dcn-fast eval gives the official model's accuracy."""
    torch.manual_seed(0)
    official = official_model("resnet-blocks").eval()
    path = tmp_path / "model_seed_2.pth"
    torch.save({"state_dict": official.state_dict()}, path)
    assert main([str(path), str(tmp_path / "resnet.pt"), "--model", "resnet-blocks"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "resnet.pt"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    data = load_cifar10(None)
    with torch.no_grad():
        expected = float((official(to_inputs(data.test_images)).argmax(1) == data.test_labels).double().mean())
    assert result["model"] == "resnet-blocks" and result["test_acc"] == pytest.approx(expected)


def test_converted_official_odenet_keeps_its_end_time(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model_seed_1.pth"
    torch.save({"state_dict": official_model("odenet").state_dict()}, path)
    assert main([str(path), str(tmp_path / "odenet.pt"), "--model", "odenet"]) == 0
    model, config, _ = load_model(tmp_path / "odenet.pt")
    assert config.T == 2.0 and {b.T for b in model.ode_blocks()} == {2.0}


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, ["--model", "dcn-ode"], "does not exist"),
        (lambda p: p.write_bytes(b"not a checkpoint"), ["--model", "dcn-ode"], "not a readable weights-only"),
        (lambda p: torch.save({"x": _Payload()}, p), ["--model", "dcn-ode"], "not a readable weights-only"),
        (lambda p: torch.save([1, 2], p), ["--model", "dcn-ode"], "holds no state dict"),
        (lambda p: torch.save(official_model("odenet").state_dict(), p), ["--model", "dcn-ode"], "not an official"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, make, args, message):
    path = tmp_path / "official.pth"
    if make is not None:
        make(path)
    assert main([str(path), str(tmp_path / "out.pt"), *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and "payload ran" not in captured.out
    assert not (tmp_path / "out.pt").exists()


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    path, out = tmp_path / "official.pth", tmp_path / "out.pt"
    torch.save(official_model("resnet-blocks").state_dict(), path)
    out.write_bytes(b"keep me")
    assert main([str(path), str(out), "--model", "resnet-blocks"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main([str(path), str(out), "--model", "resnet-blocks", "--force"]) == 0
    assert load_model(out)[0].state_dict().keys() == build("resnet-blocks").state_dict().keys()


@pytest.mark.parametrize("args", [["--model", "dcn"], []])
def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "a.pth"), str(tmp_path / "b.pt"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--model" in err
