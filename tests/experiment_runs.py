"""Running ``dcn-fast experiment NAME --quick`` in a test and checking what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dcn_fast.cli import main
from dcn_fast.train import TrainConfig, train


def run_quick(name: str, out: Path, *extra: str) -> dict:
    """``dcn-fast experiment NAME --quick --out OUT [extra]``: must exit 0; returns result.json."""
    assert main(["experiment", name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == name and result["quick"] is True
    for figure in result["figures"]:
        check_png(out / figure)
    assert result["figures"], "an experiment draws at least one figure"
    return result


def check_png(path: Path) -> None:
    """A PNG that opens, is not tiny, and is not blank (more than one colour, real contrast)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert min(pixels.shape) >= 100, f"{path} is {pixels.shape}"
    assert pixels.std() > 5 and len(np.unique(pixels)) > 10, f"{path} is blank"


def run_error(name: str, capsys, *args: str) -> str:
    """``dcn-fast experiment NAME args`` must fail with exit 2 and one line on stderr; returns it
    (argparse's own checks exit through SystemExit, with one line too)."""
    try:
        code = main(["experiment", name, "--no-progress", *args])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dcn-fast experiment {name}: error: "), err
    return err


def tiny_checkpoint(model: str, out: Path) -> Path:
    """``best.pt`` of ``model`` trained one step on one sample image per class: a checkpoint
    to hand an experiment's ``--checkpoint`` (a model of the wrong kind, say)."""
    train(TrainConfig(model=model, images_per_class=1, test_images_per_class=1, epochs=1, batch_size=10,
                      rtol=0.1, atol=0.1, gradient="backprop", out=str(out)), progress=False, log=lambda *_: None)
    return out / "best.pt"
