"""``dcn-fast plot RUN_DIR``: training curves from metrics.jsonl."""

from __future__ import annotations

import json
import random

import pytest
from experiment_runs import check_png

from dcn_fast.cli import main


def _metrics(folder, epochs: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({"epoch": e, "lr": 0.1 * 0.1 ** (e > 3), "train_loss": 2.3 / e + rng.random() * 0.1,
                                "train_acc": 0.1 + 0.05 * e, "test_loss": 2.3 / e + rng.random() * 0.2,
                                "test_acc": 0.1 + 0.04 * e, "nfe_forward": 60 + rng.randrange(20),
                                "nfe_backward": 90 + rng.randrange(30), "seconds": 1.0}) + "\n")


def test_plot_writes_curves(tmp_path, capsys):
    _metrics(tmp_path / "run", 6)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    assert str(tmp_path / "c.png") in capsys.readouterr().out
    check_png(tmp_path / "c.png")


def _one_line_error(capsys, *args) -> str:
    assert main(["plot", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dcn-fast plot: error: ")
    return err


def test_plot_errors(tmp_path, capsys):
    assert "does not exist" in _one_line_error(capsys, str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert "holds no epoch" in _one_line_error(capsys, str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    assert "line 2: not JSON" in _one_line_error(capsys, str(tmp_path / "bad"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_line_error(capsys, str(tmp_path / "file"))
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("epochs", [1, 40])
def test_plot_any_length(tmp_path, epochs):
    _metrics(tmp_path / "run", epochs)
    assert main(["plot", str(tmp_path / "run")]) == 0
    check_png(tmp_path / "run" / "curves.png")


def test_plot_refuses_damaged_records_and_unwritable_outputs(tmp_path, capsys):
    for name, text in [("null", '{"epoch": null}\n'), ("list", '{"epoch": 1, "lr": [1, 2]}\n'),
                       ("text", '{"epoch": 1, "train_loss": "low"}\n')]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
        assert "line 1: not an epoch record" in _one_line_error(capsys, str(tmp_path / name))
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00")
    assert "metrics.jsonl is not a readable metrics.jsonl (UnicodeDecodeError)" in _one_line_error(
        capsys, str(tmp_path / "binary"))
    (tmp_path / "folder" / "metrics.jsonl").mkdir(parents=True)
    assert "is not a readable metrics.jsonl" in _one_line_error(capsys, str(tmp_path / "folder"))
    _metrics(tmp_path / "run", 3)
    assert "must name a .png file" in _one_line_error(capsys, str(tmp_path / "run"), "--out",
                                                        str(tmp_path / "noext"))
    (tmp_path / "afile").write_text("x")
    assert "is a file" in _one_line_error(capsys, str(tmp_path / "run"), "--out", str(tmp_path / "afile" / "c.png"))
    assert not list(tmp_path.rglob("*.png"))


def test_plot_into_a_folder_writes_curves_png(tmp_path, capsys):
    _metrics(tmp_path / "run", 3)
    (tmp_path / "figs").mkdir()
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "figs")]) == 0
    assert str(tmp_path / "figs" / "curves.png") in capsys.readouterr().out
    check_png(tmp_path / "figs" / "curves.png")
