"""Scales (Fig. 3a, 3b): the σ = 2^scale a trained DCN learned, per SRF layer and block; σ^ji histograms; σ(t) curves.

For each trained model (the paper's DCN-ODE, DCN σ^ji and DCN σ(t) by
default, trained first with the paper's protocol unless ``--checkpoint``
gives trained ones), every SRF layer's σ = 2^scale, read from its ``scale``
parameter and named by block and layer (``stage1.conv1`` is the first
convolution of the first ODE block; DCN-full adds ``stem`` and the
downsampling convolutions ``down1.2``, ``down2.2``):

- σ per layer and block (Fig. 3a): one σ per layer; a σ^ji layer (one σ per
  (output, input) pair) as its median and quartiles; a meta-parametrised
  layer as σ at t = 0 (its ``scale``, the law's value at s = 0);
- σ^ji histograms per block (Fig. 3b): the σ of every (output, input) pair
  of the block's SRF layers, the time channel's pairs included, counted in
  bins evenly spaced in log2 σ over the model's whole range;
- σ(t) over t ∈ [0, T] for the meta-parametrised models (σ(t), σ(t²),
  σ(t) with α(t)), computed by each layer's own law
  (:meth:`dcn_fast.ode.TimeConv.meta_weights`: t clipped to [-0.5, 2.5],
  scaled by τ = 0.5), as the official layers compute it.

The official repository has no script for these figures; they are read
from the checkpoints as the paper describes them.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..models import MODELS
from ..modules import SRFConv2d
from ..ode import TimeConv
from .common import Experiment, Studied, add_studied_arguments, pyplot

HELP = "Fig. 3a, 3b: learned σ per layer and block, σ^ji histograms, σ(t) of meta-parametrised DCNs"

#: Models with SRF layers (every one but ODE-Net and ResNet-blocks).
SRF_MODELS = tuple(name for name, spec in MODELS.items() if spec.conv != "conv" or spec.srf_everywhere)

DEFAULTS = {"models": ["dcn-ode", "dcn-sigma-ji", "dcn-sigma-t"]}

#: Samples of σ(t) over [0, T], and bins of a σ^ji histogram.
T_SAMPLES = 41
BINS = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_studied_arguments(parser, SRF_MODELS, DEFAULTS["models"], "with SRF layers")


def run(exp: Experiment, args: argparse.Namespace) -> dict:
    studied = exp.studied(args, DEFAULTS["models"], SRF_MODELS, "with SRF layers")
    results = [_read_scales(s) for s in studied]
    for r in results:
        exp.log(f"[scales] {r['label']}: σ per layer: " + ", ".join(
            f"{layer['label']} {_sigma_text(layer)}" for layer in r["layers"]))
    _plot_layers(exp, results)
    if any(r["sigma_ji"] for r in results):
        _plot_histograms(exp, [r for r in results if r["sigma_ji"]])
    if any(r["sigma_t"] for r in results):
        _plot_sigma_t(exp, [r for r in results if r["sigma_t"]])
    return {"models": results}


def layer_label(name: str) -> str:
    """``stage1.func.conv1.layer`` → ``stage1.conv1``: the block, then the layer in it."""
    return name.replace(".func.", ".").removesuffix(".layer")


@torch.no_grad()
def _read_scales(s: Studied) -> dict:
    """σ per SRF layer, σ^ji histograms per block, σ(t) samples of one model (see the module doc)."""
    layers, pairs = [], {}
    blocks = list(dict(s.net.named_children()))  # stem, stage1, down1, ...: the network's order
    for name, module in s.net.named_modules():
        if not isinstance(module, SRFConv2d):
            continue
        sigma = module.sigma.double().cpu()
        block = name.split(".")[0]
        layer = {"name": name, "label": layer_label(name), "block": block, "block_index": blocks.index(block),
                 "scale_sharing": module.scale_sharing}
        if sigma.numel() == 1:
            layer["sigma"] = float(sigma)
        else:
            layer["stats"] = _stats(sigma)
            if module.scale_sharing == "pair":
                pairs.setdefault(block, []).append(module.scale.detach().double().cpu().flatten())
        layers.append(layer)
    return {"model": s.model, "label": s.label, "checkpoint": s.checkpoint, "layers": layers,
            "sigma_ji": _histograms(pairs), "sigma_t": _sigma_t(s.net)}


def _stats(sigma: torch.Tensor) -> dict:
    """Count, mean, std, min, quartiles and max of σ values (float64)."""
    q = torch.quantile(sigma.flatten(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=sigma.dtype)).tolist()
    return {"n": sigma.numel(), "mean": float(sigma.mean()), "std": float(sigma.std()) if sigma.numel() > 1 else 0.0,
            "min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4]}


def _histograms(pairs: dict[str, list[torch.Tensor]]) -> dict:
    """Per block: the σ of its pairs counted in BINS bins evenly spaced in log2 σ, shared by all blocks."""
    if not pairs:
        return {}
    scales = {block: torch.cat(parts).numpy() for block, parts in pairs.items()}
    everything = np.concatenate(list(scales.values()))
    edges = np.histogram_bin_edges(everything, bins=BINS)
    return {block: {**_stats(torch.from_numpy(2.0 ** values)), "sigma_edges": (2.0 ** edges).tolist(),
                    "counts": np.histogram(values, bins=edges)[0].tolist()}
            for block, values in scales.items()}


def _sigma_t(net: torch.nn.Module) -> dict:
    """σ(t) of every meta-parametrised layer at T_SAMPLES times over [0, T] of its block."""
    curves = {}
    for name, conv in net.named_modules():
        if not (isinstance(conv, TimeConv) and conv.time_dependent):
            continue
        T = net.get_submodule(name.split(".")[0]).T
        times = torch.linspace(0.0, T, T_SAMPLES, dtype=conv.layer.scale.dtype, device=conv.layer.scale.device)
        # One t at a time: meta_weights also forms α(t), whose shape does not broadcast over a batch of t.
        sigma = [float(2.0 ** conv.meta_weights(t)[0]) for t in times]
        curves[layer_label(name)] = {"block": name.split(".")[0], "t": times.tolist(), "sigma": sigma}
    return curves


def _sigma_text(layer: dict) -> str:
    if "sigma" in layer:
        return f"{layer['sigma']:.3g}"
    st = layer["stats"]
    return f"median {st['median']:.3g} [{st['min']:.3g}, {st['max']:.3g}]"


def _plot_layers(exp: Experiment, results: list[dict]) -> None:
    """σ per layer, the layers of all models on one axis in network order (Fig. 3a)."""
    order = sorted({(layer["block_index"], layer["label"]) for r in results for layer in r["layers"]})
    order = [label for _, label in order]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(order) + 2), 4))
    width = 0.6 / len(results)
    for i, r in enumerate(results):
        x, y, low, high = [], [], [], []
        for layer in r["layers"]:
            x.append(order.index(layer["label"]) + (i - (len(results) - 1) / 2) * width)
            mid = layer["sigma"] if "sigma" in layer else layer["stats"]["median"]
            y.append(mid)
            low.append(mid - layer["stats"]["q25"] if "stats" in layer else 0.0)
            high.append(layer["stats"]["q75"] - mid if "stats" in layer else 0.0)
        meta = " (σ at t = 0)" if r["sigma_t"] else ""
        spread = " (median, quartiles)" if any("stats" in layer for layer in r["layers"]) else ""
        ax.errorbar(x, y, yerr=[low, high], linestyle="none", marker="o", capsize=3, color=f"C{i}",
                    label=f"{r['label']}{meta}{spread}")
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_yscale("log", base=2)
    ax.set_ylabel("learned σ = 2^scale")
    ax.set_title("σ per SRF layer and block" + exp.quick_note)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    exp.figure(fig, "sigma_per_layer")


def _plot_histograms(exp: Experiment, results: list[dict]) -> None:
    """σ^ji per block, one row per σ^ji model (Fig. 3b)."""
    plt = pyplot()
    columns = max(len(r["sigma_ji"]) for r in results)
    fig, axes = plt.subplots(len(results), columns, figsize=(3.6 * columns, 3 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        for ax, (block, h) in zip(row, r["sigma_ji"].items()):
            edges = h["sigma_edges"]
            ax.stairs(h["counts"], edges, fill=True, alpha=0.7, color="C0")
            ax.axvline(h["median"], color="black", linestyle="--", linewidth=1, label=f"median {h['median']:.2f}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{r['label']}: {block} ({h['n']} pairs)", fontsize=9)
            ax.set_xlabel("σ^ji")
            ax.legend(fontsize=7)
        row[0].set_ylabel("pairs (i, o)")
    fig.suptitle("σ^ji per block" + exp.quick_note, fontsize=10)
    exp.figure(fig, "sigma_ji_histograms")


def _plot_sigma_t(exp: Experiment, results: list[dict]) -> None:
    """σ(t) of each meta-parametrised layer over [0, T], one panel per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        blocks = list(dict.fromkeys(curve["block"] for curve in r["sigma_t"].values()))
        for label, curve in r["sigma_t"].items():
            ax.plot(curve["t"], curve["sigma"], color=f"C{blocks.index(curve['block'])}",
                    linestyle="-" if label.endswith("conv1") else "--", label=label)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("t")
        ax.set_ylabel("σ(t)")
        ax.set_title(r["label"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("σ(t) of the meta-parametrised layers" + exp.quick_note, fontsize=10)
    exp.figure(fig, "sigma_t")
