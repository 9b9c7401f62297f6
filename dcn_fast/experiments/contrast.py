"""Contrast (Fig. 5): test accuracy and forward NFE of trained ODE models on inputs c·x, naive and with T' = c·T.

The protocol is the official scripts' (experiments/contrast_dcn.py and
contrast_ode_net.py of ntomen/Deep-Continuous-Networks): every test image, in
[0, 1] as the model was trained on, is multiplied by c, for the 30 contrasts
``np.logspace(-3, 0.7, 30)`` (0.001 to 5.01), with the end time of the first
ODE block set to c·T ("robust" integration: the ODE function starts with a
GroupNorm, so f(t, c·h) = f(t, h) up to its ε, and c·h(t/c) solves the
block's equation up to the time channel, which sees t instead of t/c; the
GroupNorm after block 1 removes the factor c again). Each model comes from
its own checkpoint (there: the official DCN-ODE and ODE-Net); the whole test
set in batches of 1000, as there (their ``drop_last`` drops nothing).

Where this command differs from the official scripts, and why:

- it also evaluates the naive curve (block 1 integrated to T, the input at
  contrast c), the baseline the robust curve is compared with, and adds
  c = 1 to the list (the unchanged input, which the official list lacks) so
  every curve has its reference point;
- NFE is the forward evaluations of all ODE blocks, mean per test batch (the
  paper's "total NFE"), and per block (the official scripts count block 1
  only: ``nfe_blocks[0]`` here);
- ``--robust-blocks all`` (not in the official code) also scales the input
  of every later block by c and integrates it to c·T (each is followed by a
  GroupNorm too), the NFE-saving variant DESIGN.md §4 names.

Every block's T is restored after each evaluation, also when it fails.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from dataclasses import replace

import torch

from ..models import MODELS
from ..train import TrainConfig, evaluate
from .common import Experiment, add_studied_arguments, pyplot

HELP = "Fig. 5: accuracy and NFE against input contrast c, naive and with block 1 integrated to c·T"

#: Models with ODE blocks: the only ones whose integration time can follow the contrast.
ODE_MODELS = tuple(name for name, spec in MODELS.items() if spec.stage == "ode")

#: The official contrasts, np.logspace(-3, 0.7, 30), and c = 1 (the unchanged input).
OFFICIAL_CONTRASTS = [10 ** (-3 + 3.7 * i / 29) for i in range(30)]
DEFAULTS = {"models": ["dcn-ode", "odenet"], "contrasts": sorted(OFFICIAL_CONTRASTS + [1.0])}
QUICK = {"models": ["dcn-ode", "odenet"], "contrasts": [0.01, 0.1, 1.0]}

#: The official scripts' test batch (``--test_batch_size 1000``): NFE is counted per batch.
EVAL_BATCH_SIZE = 1000

#: DESIGN.md §4's reading of Fig. 5: total forward NFE 102 at c = 1 and 60 at c = 0.06
#: with robust integration, losing less than 0.5 % accuracy.
PAPER = {"c": [1.0, 0.06], "nfe_total": [102, 60], "accuracy_loss_below": 0.005}

ROBUST_BLOCKS = ("first", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_studied_arguments(parser, ODE_MODELS, DEFAULTS["models"], "with ODE blocks")
    parser.add_argument("--contrasts", nargs="+", type=float, metavar="C",
                        help="contrasts c > 0 (finite): the model sees c·x (default: the official 30, "
                             f"np.logspace(-3, 0.7, 30), and 1; --quick: {' '.join(map(str, QUICK['contrasts']))})")
    parser.add_argument("--robust-blocks", choices=ROBUST_BLOCKS, default="first",
                        help="robust integration: block 1 to c·T (first, the official protocol), or every block, "
                             "the later ones with their input scaled by c too (all) (default: first)")


def run(exp: Experiment, args: argparse.Namespace) -> dict:
    defaults = QUICK if exp.quick else DEFAULTS
    contrasts = args.contrasts or defaults["contrasts"]
    for c in contrasts:
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"--contrasts must be finite numbers > 0, got {c}")
    contrasts = sorted(set(contrasts))
    studied = exp.studied(args, defaults["models"], ODE_MODELS, "with ODE blocks")
    images, labels = exp.test_set(studied=True)
    results = []
    for s in studied:
        config = replace(s.config, eval_batch_size=EVAL_BATCH_SIZE)
        exp.log(f"[contrast] {s.label}: {len(contrasts)} contrasts × (naive, robust) on {len(labels)} test images")
        curves = contrast_curves(s.net, images, labels, config, contrasts, args.robust_blocks)
        results.append({"model": s.model, "label": s.label, "checkpoint": s.checkpoint,
                        "T": [b.T for b in s.net.ode_blocks()], **curves})
        _log_table(exp, s.label, contrasts, curves)
    _plot(exp, contrasts, results, args.robust_blocks)
    return {"contrasts": contrasts, "robust_blocks": args.robust_blocks, "eval_batch_size": EVAL_BATCH_SIZE,
            "test_images": len(labels), "paper": PAPER, "models": results}


@contextmanager
def robust_integration(model: torch.nn.Module, c: float, blocks: str = "first"):
    """Within the scope, the first ODE block of ``model`` integrates to c·T (``blocks="all"``:
    every block, those after the first with their input multiplied by c). Every T is
    restored, and every hook removed, on leaving, also on an error."""
    if blocks not in ROBUST_BLOCKS:
        raise ValueError(f"blocks must be one of {', '.join(ROBUST_BLOCKS)}, got {blocks!r}")
    ode = model.ode_blocks()
    chosen = ode[:1] if blocks == "first" else ode
    saved = [block.T for block in chosen]
    # Block 1's input is c·x already (the stem is linear up to its bias); a later block's input
    # comes from a downsampling that starts with a GroupNorm, which undid c: it gets c back here.
    hooks = []
    try:
        for block, T in zip(chosen, saved):
            block.T = T * c
        for block in chosen[1:]:
            hooks.append(block.register_forward_pre_hook(lambda module, inputs: (inputs[0] * c, *inputs[1:])))
        yield
    finally:
        for block, T in zip(chosen, saved):
            block.T = T
        for hook in hooks:
            hook.remove()


def contrast_curves(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                    contrasts: list[float], blocks: str = "first") -> dict:
    """Accuracy, loss and forward NFE of ``model`` on ``images`` at each contrast, naive and robust
    (:func:`robust_integration`). Returns ``{"naive": curve, "robust": curve}``, each curve a dict
    of lists over ``contrasts``: ``acc``, ``loss``, ``nfe`` (all blocks, mean per batch),
    ``nfe_max`` (largest per batch) and ``nfe_blocks`` (per block, mean per batch)."""
    curves = {"naive": _empty_curve(), "robust": _empty_curve()}
    for c in contrasts:
        try:
            _append(curves["naive"], _measure(model, images, labels, config, c))
            with robust_integration(model, c, blocks):
                _append(curves["robust"], _measure(model, images, labels, config, c))
        except FloatingPointError as exc:  # the solve failed: say at which contrast, and the likely cause
            raise FloatingPointError(f"at contrast c = {c:g}: {exc}; inputs scaled by c = {c:g} may not be "
                                     "representable in the model's float type") from exc
    return curves


def _empty_curve() -> dict:
    return {"acc": [], "loss": [], "nfe": [], "nfe_max": [], "nfe_blocks": []}


def _append(curve: dict, point: dict) -> None:
    for key, values in curve.items():
        values.append(point[key])


def _measure(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
             c: float) -> dict:
    """One evaluation at contrast c, counting each ODE block's forward NFE per batch."""
    blocks = model.ode_blocks()
    sums, calls = [0] * len(blocks), [0] * len(blocks)

    def counter(i: int):
        def count(module, inputs, output) -> None:
            sums[i] += module.nfe_forward
            calls[i] += 1

        return count

    handles = [block.register_forward_hook(counter(i)) for i, block in enumerate(blocks)]
    try:
        result = evaluate(model, images, labels, config, transform=lambda x: x * c)
    finally:
        for handle in handles:
            handle.remove()
    return {"acc": result["acc"], "loss": result["loss"], "nfe": result["nfe_forward_mean"],
            "nfe_max": result["nfe_forward"], "nfe_blocks": [s / n for s, n in zip(sums, calls)]}


def _log_table(exp: Experiment, label: str, contrasts: list[float], curves: dict) -> None:
    naive, robust = curves["naive"], curves["robust"]
    exp.log(f"[contrast] {label}: test accuracy (%) and forward NFE (all blocks, mean per batch)")
    exp.log("| c | acc naive | acc robust | NFE naive | NFE robust |")
    for i, c in enumerate(contrasts):
        exp.log(f"| {c:.4g} | {100 * naive['acc'][i]:.1f} | {100 * robust['acc'][i]:.1f} | "
                f"{naive['nfe'][i]:.1f} | {robust['nfe'][i]:.1f} |")


def _plot(exp: Experiment, contrasts: list[float], results: list[dict], blocks: str) -> None:
    plt = pyplot()
    fig, (acc_ax, nfe_ax) = plt.subplots(1, 2, figsize=(11, 4))
    robust = "T' = c·T in block 1" if blocks == "first" else "T' = c·T in every block"
    for i, r in enumerate(results):
        for mode, style, what in (("naive", "--", "naive"), ("robust", "-", robust)):
            kwargs = {"color": f"C{i}", "linestyle": style, "marker": "o", "markersize": 3,
                      "label": f"{r['label']}, {what}"}
            acc_ax.plot(contrasts, [100 * a for a in r[mode]["acc"]], **kwargs)
            nfe_ax.plot(contrasts, r[mode]["nfe"], **kwargs)
    nfe_ax.plot(PAPER["c"], PAPER["nfe_total"], linestyle="none", marker="x", markersize=9, color="black",
                label="paper: total NFE 102 → 60 at c = 0.06")
    for ax, ylabel in ((acc_ax, "test accuracy (%)"), (nfe_ax, "forward NFE, all blocks (mean per batch)")):
        ax.set_xscale("log")
        ax.set_xlabel("contrast c (input c·x)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Contrast" + exp.quick_note)
    exp.figure(fig, "contrast")
