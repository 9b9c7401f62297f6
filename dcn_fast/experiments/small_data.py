"""Small data (Table 2): best test accuracy of models trained on n images per class.

Every (model, n, seed) cell is a training run of the paper's protocol on a
per-class subset of n training images drawn with the seed (epochs ×10 / ×5 /
×2 at ≤ 52 / ≤ 103 / ≤ 512 images per class, :func:`dcn_fast.train.default_epochs`),
kept under ``OUT/runs/<model>-n<n>-seed<seed>``; the best test accuracy of
each run is reported as mean ± std over the seeds, and plotted against n.
"""

from __future__ import annotations

import argparse

from ..models import MODELS
from .common import Experiment, mean_std, pyplot

HELP = "Table 2: best test accuracy against images per class, mean ± std over seeds"

#: Table 2 of the paper, test accuracy in %: (model, images per class) → value.
PAPER = {("dcn-ode", 128): 58.2, ("odenet", 128): 50.7, ("dcn-ode", 1024): 79.7, ("odenet", 1024): 77.4}

DEFAULTS = {"models": ["dcn-ode", "odenet"], "n": [128, 1024], "seeds": [0, 1, 2]}
QUICK = {"models": ["dcn-ode", "odenet"], "n": [4, 8], "seeds": [0, 1]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=list(MODELS), metavar="MODEL",
                        help=f"models to compare (default: {' '.join(DEFAULTS['models'])})")
    parser.add_argument("--n", nargs="+", type=int, metavar="N",
                        help=f"training images per class, 1..5000 (default: the paper's cells, "
                             f"{' '.join(map(str, DEFAULTS['n']))}; --quick: {' '.join(map(str, QUICK['n']))})")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help=f"seeds of each cell (default: {' '.join(map(str, DEFAULTS['seeds']))}; "
                             f"--quick: {' '.join(map(str, QUICK['seeds']))})")


def run(exp: Experiment, args: argparse.Namespace) -> dict:
    defaults = QUICK if exp.quick else DEFAULTS
    models = list(dict.fromkeys(args.models or defaults["models"]))
    sizes = sorted(set(args.n or defaults["n"]))
    seeds = sorted(set(args.seeds if args.seeds is not None else defaults["seeds"]))
    available = min(int((exp.data.train_labels == c).sum()) for c in range(10))
    for n in sizes:
        if not 1 <= n <= available:
            raise ValueError(f"--n must be in 1..{available} (images per class in {exp.data.source}), got {n}")
    for seed in seeds:
        if not 0 <= seed < 2**32:
            raise ValueError(f"--seeds must be in 0..2**32-1, got {seed}")

    cells = []
    total = len(models) * len(sizes) * len(seeds)
    for model in models:
        for n in sizes:
            accuracies = []
            for seed in seeds:
                exp.log(f"[small-data] cell {len(cells) * len(seeds) + len(accuracies) + 1}/{total}: "
                        f"{model}, {n} images per class, seed {seed}")
                summary = exp.train(model, run=f"{model}-n{n}-seed{seed}", images_per_class=n, seed=seed)
                accuracies.append(summary["best_test_acc"])
            cells.append({"model": model, "images_per_class": n, "seeds": seeds, "best_test_acc": accuracies,
                          **mean_std(accuracies), "paper": PAPER.get((model, n))})
    _plot(exp, cells, models)
    exp.log("[small-data] best test accuracy, mean ± std over seeds (%):")
    exp.log("| model | " + " | ".join(f"n = {n}" for n in sizes) + " |")
    for model in models:
        row = [f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" for c in cells if c["model"] == model]
        exp.log(f"| {model} | " + " | ".join(row) + " |")
    return {"cells": cells}


def _plot(exp: Experiment, cells: list[dict], models: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, model in enumerate(models):
        mine = [c for c in cells if c["model"] == model]
        n = [c["images_per_class"] for c in mine]
        ax.errorbar(n, [100 * c["mean"] for c in mine], yerr=[100 * c["std"] for c in mine], marker="o",
                    capsize=3, color=f"C{i}", label=f"{model} (this run)")
        paper = [(c["images_per_class"], c["paper"]) for c in mine if c["paper"] is not None]
        if paper:
            ax.plot(*zip(*paper), linestyle="none", marker="x", markersize=8, color=f"C{i}",
                    label=f"{model} (paper, Table 2)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title("Small data" + exp.quick_note)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    exp.figure(fig, "accuracy_vs_n")
