"""Files of a training run: checkpoints, ``metrics.jsonl`` and ``summary.json``.

A checkpoint is a dict of plain Python values and tensors only (the run's
settings as a dict, the model and optimizer state dicts, the epoch, the best
result and the history of per-epoch metrics), so it loads with
``torch.load(weights_only=True)``: a file that would run code when unpickled
is refused, never executed.

Every file is written atomically (a temporary file, then ``os.replace``), so a
crash leaves either the previous version or the new one, never half of one.
``metrics.jsonl`` is rewritten from the checkpoint's history on resume: the
checkpoint is the record, and a run killed between writing the checkpoint and
appending its metrics line gets that line back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_FORMAT", "check_output_folder", "save_checkpoint", "load_checkpoint", "write_json", "append_metrics", "write_metrics"]

#: 2: inputs in [0, 1] unless ``config["normalize"]``. Format 1 checkpoints
#: (always standardised inputs) load as ``normalize=True``.
CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """Raise ValueError, naming ``option``, if ``path`` or a folder above it is a file: the
    outputs could not be written there (checked up front, before any work is done)."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            where = "" if part == path else f" (inside {part}, a file)"
            raise ValueError(f"{option} {path} is a file{where}; give a folder for the outputs")


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp_path)``, then move the result over ``path`` in one step."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` (plain values and tensors only) to ``path`` atomically."""
    _replace_atomically(path, lambda tmp: torch.save(state, tmp))


def write_json(obj, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

    _replace_atomically(path, write)


def write_metrics(history: list[dict], path: Path) -> None:
    """Rewrite ``metrics.jsonl`` atomically: one JSON line per epoch of ``history``."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in history)

    _replace_atomically(path, write)


def append_metrics(record: dict, path: Path) -> None:
    """Append one epoch's line to ``metrics.jsonl``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, weights only.

    Returns the checkpoint dict, its ``config`` upgraded to the current format.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder, not a readable file, or not a dcn_fast
            checkpoint (including a pickle that would run code: it is refused).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; give a file such as {path / 'best.pt'}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever a damaged or foreign file makes the unpickler raise
        if "Weights only load failed" in str(exc):
            reason = ("it holds objects other than tensors and plain values; refused, since unpickling them could "
                      "run code; an official model_*.pth? convert it first: python -m dcn_fast.convert")
        else:
            detail = (str(exc).strip().splitlines() or [""])[0]
            reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise ValueError(f"{path} is not a readable dcn_fast checkpoint ({reason})") from exc
    if not (isinstance(ckpt, dict) and ckpt.get("format") in _READABLE_FORMATS and isinstance(ckpt.get("config"), dict)):
        raise ValueError(f"{path} is not a dcn_fast checkpoint (format {CHECKPOINT_FORMAT}); official weights "
                         "convert with python -m dcn_fast.convert")
    missing = {"epoch", "epochs", "model_state", "optimizer_state", "best", "history"} - ckpt.keys()
    if missing:
        raise ValueError(f"{path} is an incomplete dcn_fast checkpoint (no {', '.join(sorted(missing))})")
    if ckpt["format"] == 1:
        ckpt["config"].setdefault("normalize", True)
    return ckpt
