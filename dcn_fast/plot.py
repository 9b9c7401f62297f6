"""Figures: matplotlib set up for files only, and ``dcn-fast plot RUN_DIR`` (training curves)."""

from __future__ import annotations

import json
from pathlib import Path

from .runfiles import check_output_folder

__all__ = ["pyplot", "save_figure", "read_metrics", "plot_run"]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG at 100 dpi (figures stay small, tens of KB) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path


#: The per-epoch numbers that are plotted.
_SERIES = ("train_loss", "test_loss", "train_acc", "test_acc", "nfe_forward", "nfe_backward", "lr")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (written by ``dcn-fast train``).

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
        ValueError: a line that is not a JSON record of an epoch, or no line at all.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if Path(run_dir).is_file():
        raise ValueError(f"RUN_DIR {run_dir} is a file; give the folder of a run (it holds metrics.jsonl)")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; RUN_DIR must be a folder written by dcn-fast train")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable metrics.jsonl ({type(exc).__name__})") from exc
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
        if not (isinstance(record, dict) and _is_number(record.get("epoch"))
                and all(_is_number(record[k]) for k in _SERIES if k in record)):
            raise ValueError(f"{path}, line {number}: not an epoch record of dcn-fast train "
                             f"(an epoch and numbers for {', '.join(_SERIES)})")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no epoch yet; plot it after the first epoch")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, accuracy, NFE and learning rate against the epoch, one panel each, as
    ``out`` (default ``RUN_DIR/curves.png``); returns the path written."""
    records = read_metrics(Path(run_dir))
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    if out.is_dir():
        out = out / "curves.png"
    elif out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} must name a .png file (or a folder, to write curves.png there)")
    check_output_folder(out.parent)
    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in records]

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharex=True)
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train"), ("test_loss", "test")]),
        (axes[0, 1], "accuracy", [("train_acc", "train"), ("test_acc", "test")]),
        (axes[1, 0], "NFE per step (3 blocks)", [("nfe_forward", "forward"), ("nfe_backward", "backward")]),
        (axes[1, 1], "learning rate", [("lr", "lr")]),
    ]
    for ax, title, keys in panels:
        for key, label in keys:
            ax.plot(epochs, series(key), marker="o" if len(epochs) < 30 else None, label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    axes[1, 1].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    if len(epochs) == 1:  # one point: no fractional epoch ticks around it
        for ax in axes[1]:
            ax.set_xticks(epochs)
    fig.suptitle(f"{Path(run_dir).resolve().name}: {len(records)} epoch{'s' if len(records) != 1 else ''}")
    return save_figure(fig, out)
