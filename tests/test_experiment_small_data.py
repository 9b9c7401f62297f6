"""``dcn-fast experiment small-data`` (Table 2) and ``dcn-fast plot`` on the runs it trains."""

from __future__ import annotations

import json
import math

import pytest
from experiment_runs import check_png, run_error, run_quick

from dcn_fast.cli import main
from dcn_fast.experiments.small_data import QUICK


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("small-data") / "out"
    return out, run_quick("small-data", out)


def test_quick_cells(quick):
    out, result = quick
    cells = result["cells"]
    assert [(c["model"], c["images_per_class"]) for c in cells] == [
        (m, n) for m in QUICK["models"] for n in QUICK["n"]]
    for cell in cells:
        accs = cell["best_test_acc"]
        assert len(accs) == len(QUICK["seeds"]) and all(0 <= a <= 1 for a in accs)
        assert cell["mean"] == pytest.approx(sum(accs) / len(accs))
        mean = sum(accs) / len(accs)
        assert cell["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)))
        # Every (model, n, seed) is its own run, trained on n images of each class.
        for seed, acc in zip(cell["seeds"], accs):
            summary = json.loads((out / "runs" / f"{cell['model']}-n{cell['images_per_class']}-seed{seed}"
                                  / "summary.json").read_text())
            assert summary["train_images"] == 10 * cell["images_per_class"]
            assert summary["best_test_acc"] == acc


def test_rerun_reuses_the_finished_runs(quick, capsys):
    out, result = quick
    # A model named twice is one model.
    again = run_quick("small-data", out, "--models", "dcn-ode", "dcn-ode", "odenet")
    assert "continuing the training there" in capsys.readouterr().out
    assert again["cells"] == result["cells"]


def test_rerun_with_other_settings_is_refused(quick, capsys):
    """The experiment would report settings its models were not trained with."""
    out, result = quick
    err = run_error("small-data", capsys, "--quick", "--out", str(out), "--epochs", "2", "--lr", "0.05")
    assert "holds a training started with other settings (--epochs 1 -> 2, --lr 0.1 -> 0.05)" in err
    assert json.loads((out / "result.json").read_text())["cells"] == result["cells"]


def test_seeds_draw_different_subsets(quick):
    """The seed changes the images drawn: two seeds of one cell are not the same run."""
    out, _ = quick
    model, n = QUICK["models"][0], QUICK["n"][-1]
    losses = [json.loads((out / "runs" / f"{model}-n{n}-seed{s}" / "metrics.jsonl").read_text())["train_loss"]
              for s in QUICK["seeds"]]
    assert losses[0] != losses[1]


def test_plot_of_a_trained_run(quick, capsys):
    out, _ = quick
    run = out / "runs" / f"{QUICK['models'][0]}-n{QUICK['n'][0]}-seed0"
    assert main(["plot", str(run)]) == 0
    assert str(run / "curves.png") in capsys.readouterr().out
    check_png(run / "curves.png")


@pytest.mark.parametrize("args, needle", [
    (["--n", "0"], "--n must be in 1..200"),
    (["--n", "201"], "--n must be in 1..200"),
    (["--seeds", "-1"], "--seeds must be in 0..2**32-1"),
    (["--test-images-per-class", "51"], "--test-images-per-class must be in 1..50"),
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
])
def test_errors(tmp_path, capsys, args, needle):
    err = run_error("small-data", capsys, "--quick", "--out", str(tmp_path / "out"), *args)
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_out_inside_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = run_error("small-data", capsys, "--quick", "--out", str(tmp_path / "file" / "sub"))
    assert f"--out {tmp_path / 'file' / 'sub'} is a file (inside {tmp_path / 'file'}, a file)" in err


def test_an_interrupt_is_one_line_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    from dcn_fast.experiments import small_data

    def interrupted(exp, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(small_data, "run", interrupted)
    assert main(["experiment", "small-data", "--quick", "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("dcn-fast experiment small-data: interrupted; run the same command (same --out) again to "
                   "continue from the last checkpoint")
