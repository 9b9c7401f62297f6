"""What every experiment shares: its options, its trainings, its data, its figures and ``result.json``.

An experiment is a module with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(exp: Experiment, args) -> dict``; :class:`Experiment` gives it the
run's folder, the classifiers it needs (trained with :func:`dcn_fast.train.train`,
reused or resumed when the command is run again), the data and the figure
writer, and ``run``'s dict becomes ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..arguments import positive_float, positive_int
from ..data import CIFAR10, load_cifar10
from ..functional import BACKENDS
from ..ode import GRADIENTS
from ..plot import pyplot, save_figure
from ..runfiles import check_output_folder, write_json
from ..train import TrainConfig, changed_settings, eval_split, load_model, train

__all__ = ["QUICK_TRAINING", "QUICK_STUDIED", "TRAINING_OPTIONS", "Experiment", "Studied", "add_common_arguments",
           "add_studied_arguments", "mean_std", "pyplot"]

#: What ``--quick`` trains with: one epoch in batches of 20, loose tolerances, tested on
#: 10 images per class; each experiment chooses the training images (a per-class subset).
#: Every --quick runs in 12-50 s on 2 CPU cores; its numbers show the pipeline, not the paper.
QUICK_TRAINING = {"test_images_per_class": 10, "epochs": 1, "batch_size": 20, "rtol": 0.1, "atol": 0.1,
                  "gradient": "backprop"}

#: What ``--quick`` trains a model with when the experiment studies the trained model
#: rather than its training (completion, contrast, reconstruction's encoders, scales): on
#: top of QUICK_TRAINING, one step on 2 images per class, tested on 2 per class.
QUICK_STUDIED = {"images_per_class": 2, "test_images_per_class": 2}

#: TrainConfig settings an experiment's command line can override for the trainings it runs.
TRAINING_OPTIONS = ("epochs", "batch_size", "lr", "gradient", "rtol", "atol", "backend", "amp",
                    "test_images_per_class")


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of every ``dcn-fast experiment NAME``."""
    parser.add_argument("--out", help=f"output folder (default: runs/{name}-<date>-<time>); running the same "
                                      "command again reuses its finished trainings and resumes unfinished ones")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a few training steps, on the shipped sample unless --data-root is given "
                             "(12-50 s on 2 CPU cores)")
    parser.add_argument("--data-root", help="CIFAR-10: torchvision folder, JPEG tree or .tar.xz "
                                            "(default: the sample shipped in the package)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    training = parser.add_argument_group("training (of the models the experiment trains; default: the paper's "
                                         "protocol, or --quick's)")
    training.add_argument("--epochs", type=positive_int, help="epochs of every training")
    training.add_argument("--batch-size", type=positive_int, help="batch size")
    training.add_argument("--lr", type=positive_float, help="initial learning rate")
    training.add_argument("--gradient", choices=GRADIENTS, help="how ODE solves are differentiated")
    training.add_argument("--rtol", type=positive_float, help="solver relative tolerance")
    training.add_argument("--atol", type=positive_float, help="solver absolute tolerance")
    training.add_argument("--backend", choices=BACKENDS, help="SRF backend")
    training.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    training.add_argument("--test-images-per-class", type=positive_int,
                          help="test images per class evaluated (default: all; --quick: 10, or 2 where it "
                               "studies trained models)")


def add_studied_arguments(parser: argparse.ArgumentParser, models: tuple[str, ...], defaults: list[str],
                          needs: str) -> None:
    """``--models`` and ``--checkpoint`` of an experiment that studies trained classifiers
    (:meth:`Experiment.studied`); ``models`` are those it accepts, models ``needs`` says."""
    parser.add_argument("--models", nargs="+", choices=models, metavar="MODEL",
                        help=f"models to train (or reuse from OUT/runs/) and study (default: {' '.join(defaults)}; "
                             f"models {needs}: {', '.join(models)})")
    parser.add_argument("--checkpoint", nargs="+", metavar="PATH",
                        help=f"study these trained models instead (best.pt or last.pt of dcn-fast train, or "
                             f"official weights converted by python -m dcn_fast.convert; each checkpoint names "
                             f"its model, one {needs})")


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "n"}``; std is the sample standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "n": len(values)}


@dataclass
class Studied:
    """A trained classifier an experiment studies: its model name, checkpoint, the model
    (eval mode) with its TrainConfig, the epochs it was trained and its best test accuracy
    (None for converted official weights), and the label its figures give it (the model's
    name, with its 1-based place among the checkpoints where two hold the same model)."""

    model: str
    checkpoint: str
    net: torch.nn.Module
    config: TrainConfig
    epoch: int = 0
    best_acc: float | None = None
    label: str = ""

    @property
    def key(self) -> str:
        """The label as a file name: ``odenet``, or ``odenet-2`` for ``odenet [2]``."""
        return self.label.replace(" [", "-").rstrip("]")


@dataclass
class Experiment:
    """One run of an experiment: where it writes, how it trains, what it has written."""

    name: str
    out: Path
    quick: bool = False
    data_root: str | None = None
    device: str | None = None
    progress: bool = True
    training: dict = field(default_factory=dict)  # TrainConfig overrides from the command line
    log: Callable[[str], None] = print
    figures: list[str] = field(default_factory=list)
    _data: CIFAR10 | None = None

    @classmethod
    def from_args(cls, name: str, args: argparse.Namespace, log: Callable[[str], None] = print) -> Experiment:
        out = Path(args.out or time.strftime(f"runs/{name}-%Y%m%d-%H%M%S"))
        check_output_folder(out)
        training = {k: getattr(args, k) for k in TRAINING_OPTIONS if getattr(args, k, None) is not None}
        return cls(name, out, quick=args.quick, data_root=args.data_root, device=args.device,
                   progress=not args.no_progress, training=training, log=log)

    # -- data --------------------------------------------------------------------------------
    @property
    def data(self) -> CIFAR10:
        if self._data is None:
            self._data = load_cifar10(self.data_root)
        return self._data

    def test_set(self, studied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The test images and labels the experiment evaluates on: all, or ``--quick``'s
        10 per class (``studied``: the 2 per class of :data:`QUICK_STUDIED`, which its
        models were tested on); ``--test-images-per-class`` wins over both."""
        return eval_split(self.data, TrainConfig(**self._test_subset(studied)))

    def _test_subset(self, studied: bool = False) -> dict:
        quick = (QUICK_STUDIED if studied else QUICK_TRAINING)["test_images_per_class"]
        n = self.training.get("test_images_per_class", quick if self.quick else None)
        return {"test_images_per_class": n}

    @property
    def quick_note(self) -> str:
        """What figure titles of a ``--quick`` run add (nothing otherwise)."""
        return " (--quick: a few training steps)" if self.quick else ""

    # -- trainings ---------------------------------------------------------------------------
    def config(self, model: str, out: Path, **settings) -> TrainConfig:
        """The TrainConfig of one training: the paper's protocol (or ``--quick``'s), then
        ``settings`` (the experiment's, e.g. images_per_class), then the command line's."""
        base = QUICK_TRAINING if self.quick else {}
        # The command line's test subset (in self.training) wins over the experiment's settings.
        merged = {**base, **self._test_subset(), **settings, **self.training}
        return TrainConfig(model=model, data_root=self.data_root, device=self.device, out=str(out), **merged)

    def train(self, model: str, run: str | None = None, **settings) -> dict:
        """Train ``model`` into ``out/runs/<run>`` (default ``<model>``) and return its summary.

        A finished run in that folder is reused and an unfinished one resumed,
        so an interrupted experiment loses at most one epoch of one training.
        """
        folder = self.out / "runs" / (run or model)
        return train(self.continued(self.config(model, folder, **settings)), progress=self.progress, log=self.log)

    def continued(self, config: TrainConfig) -> TrainConfig:
        """``config``, or the run already in ``config.out`` (resumed; nothing to do if finished)
        when it was started with the same settings. Other settings there are refused: the
        experiment would report settings its models were not trained with."""
        if not (Path(config.out) / "last.pt").exists():
            return config
        saved = TrainConfig.from_run(config.out)
        changed = changed_settings(saved, config, ignore=("device",))
        if changed:
            raise ValueError(f"{config.out} holds a training started with other settings ({', '.join(changed)}); "
                             "rerun with the options it was started with, or choose another --out")
        self.log(f"[{self.name}] {config.out}: continuing the training there (nothing to do if it has finished)")
        return saved

    def studied(self, args: argparse.Namespace, defaults: list[str], accepted: tuple[str, ...],
                needs: str, trains_more: bool = False) -> list[Studied]:
        """The trained classifiers an experiment studies (options of :func:`add_studied_arguments`):
        those of ``args.checkpoint``, else ``args.models`` (default ``defaults``; each once)
        trained first (``--quick``: :data:`QUICK_STUDIED`). All are loaded before any is
        studied, so a checkpoint of a model not in ``accepted`` (models ``needs`` says) fails
        at once. With checkpoints nothing is trained, so training options are refused
        unless the experiment trains something else (``trains_more``)."""
        if args.checkpoint and args.models:
            raise ValueError("--models and --checkpoint exclude each other: give the models to train, "
                             "or the checkpoints of trained ones")
        unused = [k for k in self.training if k != "test_images_per_class"]
        if args.checkpoint and unused and not trains_more:
            options = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ValueError(f"{options}: training options, but with --checkpoint {self.name} trains nothing; "
                             "leave them out")
        settings = QUICK_STUDIED if self.quick else {}
        models = list(dict.fromkeys(args.models or defaults))
        paths = args.checkpoint or [self.train(m, **settings)["checkpoint"] for m in models]
        loaded = []
        for path in paths:
            net, config, ckpt = load_model(path, self.device)
            if config.model not in accepted:
                raise ValueError(f"--checkpoint {path} holds model {config.model!r}; {self.name} needs a model "
                                 f"{needs}: {', '.join(accepted)}")
            loaded.append(Studied(config.model, str(Path(path).resolve()), net, config, ckpt["epoch"],
                                  (ckpt["best"] or {}).get("acc")))
        names = [s.model for s in loaded]
        for i, s in enumerate(loaded, 1):  # two checkpoints of one model are told apart by their place in the list
            s.label = s.model if names.count(s.model) == 1 else f"{s.model} [{i}]"
        return loaded

    # -- outputs -----------------------------------------------------------------------------
    def figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as ``out/<name>.png`` (small: 100 dpi) and close it."""
        path = save_figure(fig, self.out / f"{name}.png")
        self.figures.append(path.name)
        return path

    def finish(self, result: dict, args: argparse.Namespace) -> dict:
        """Write ``result.json`` (the experiment, its settings, its figures and ``result``) and say where."""
        settings = {k: v for k, v in vars(args).items() if k not in ("run", "command", "experiment")
                    and not callable(v)}
        record = {"experiment": self.name, "quick": self.quick, "settings": settings,
                  "figures": list(self.figures), **result}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(json.loads(json.dumps(record, default=str)), self.out / "result.json")
        self.log(f"[{self.name}] result: {self.out / 'result.json'}")
        for name in self.figures:
            self.log(f"[{self.name}] figure: {self.out / name}")
        return record
