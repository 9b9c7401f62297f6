"""Pattern completion (Fig. 3c, 4, A.2, A.3): test accuracy with a zeroed centre patch, and how far the masked image's feature maps stay from the clean ones over the integration time of each block.

At test time only, an n×n patch at the centre of every image (rows and
columns ``(32 - n) // 2`` onwards, all three channels) is set to zero on the
[0, 1] input, as the official scripts do (``experiments/pattern_comp_dcn.py``,
``pattern_comp_ode_net.py``, ``pattern_comp_resnet_blocks.py``: ``ToTensor()``
then ``x[:, :, 9:23, 9:23] = 0``, i.e. n = 14 with this placement; a model
trained on standardised inputs gets the black pixel in its own input space).
The models are the official scripts' three: DCN-ODE (T = 2), ODE-Net (T = 1)
and ResNet-blocks (one residual block per stage), trained with the paper's
protocol or given as checkpoints.

1. Accuracy against mask size: the test set (default: all of it) at each n,
   and unmasked (n = 0) as the reference, with the forward NFE.
2. The total difference inside each block k, for every image of a fixed
   subset of the test set (``--images``, drawn with seed 0):
   ``D_k(t) = Σ |h_k(t) − h_k,masked(t)| / A_k``, the sum over the channels and
   pixels of block k's feature map and ``A_k = C·H·W`` its number of elements
   (so D is the mean absolute difference per activation and blocks of
   different size compare). The clean and the masked image each run through the
   model block by block: block k's input is the previous block's output at T
   after the downsampling, and ``ODEBlock.trajectory`` gives h(t) on an even
   grid of ``--times`` points over [0, T] in one solve (dopri5's
   interpolation; h(T) is the forward's). A residual block has two points, its
   input (t = 0) and its output (t = 1). Reported: mean ± std over the images,
   per time point, block, mask and model.
3. Feature maps of one test image at the largest mask: the input, the masked
   input, and per block the channel mean of |h(T)| clean, masked, and of
   |h(T) − h_masked(T)|.

Where this deviates from the official code: the official scripts record
h(t) of the first image of each test batch at every evaluation of the ODE
function (the solver's own, uneven, stage times, accepted or not) and do not
contain the D(t) computation or the definition of A; here D(t) is computed on
an even time grid for many images, with A = C·H·W. The official scripts mask
14×14; the paper's figures use n = 6, 8, 10, 12 (the default here).
"""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple

import torch

from ..data import to_inputs
from ..models import MODELS, Classifier
from ..ode import ODEBlock
from ..train import TrainConfig, evaluate
from .common import Experiment, add_studied_arguments, pyplot

HELP = "Fig. 3c, 4, A.2, A.3: accuracy against a zeroed centre patch, and D(t) inside each block"

DEFAULTS = {"models": ["dcn-ode", "odenet", "resnet-blocks"], "masks": [6, 8, 10, 12], "times": 21, "images": 1000}
QUICK = {"models": DEFAULTS["models"], "masks": [6, 12], "times": 5, "images": 4}

MAX_TIMES = 1001  # a grid step of T/1000 is finer than any figure needs

# Images per block-by-block run: the clean run's states at every grid point of all
# three blocks are held while each masked run is compared with them. One image's states
# at one time point are (32·30² + 64·15² + 128·7²) float32 ≈ 198 KB; with the masked
# run's and the difference's, about 3× that. The batch is sized to keep them near 1 GB.
STATE_BYTES = 3 * 4 * (32 * 30 * 30 + 64 * 15 * 15 + 128 * 7 * 7)
MEMORY_BUDGET = 2**30


def trajectory_batch(points: int) -> int:
    """Images per block-by-block run at ``points`` time points (1..100)."""
    return max(1, min(100, MEMORY_BUDGET // (points * STATE_BYTES)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every model of the paper has three stages (ODE or residual blocks): all are accepted.
    add_studied_arguments(parser, tuple(MODELS), DEFAULTS["models"], "with three stages")
    parser.add_argument("--masks", nargs="+", type=int, metavar="N",
                        help=f"side of the zeroed centre patch, 1..32 (default: "
                             f"{' '.join(map(str, DEFAULTS['masks']))}; --quick: {' '.join(map(str, QUICK['masks']))});"
                             " the unmasked accuracy (0) is always reported too")
    parser.add_argument("--times", type=int, metavar="K",
                        help=f"points of the time grid of each ODE block, 0..T, 2..{MAX_TIMES} "
                             f"(default: {DEFAULTS['times']}; --quick: {QUICK['times']})")
    parser.add_argument("--images", type=int, metavar="N",
                        help=f"test images D(t) averages over (default: {DEFAULTS['images']}, or all the test "
                             f"images if fewer; "
                             f"--quick: {QUICK['images']})")


# -- the mask and the difference -------------------------------------------------------------

def centre_patch(n: int, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the n×n centre patch (the official 14×14 patch is rows/columns 9..22 of 32)."""
    top, left = (height - n) // 2, (width - n) // 2
    return slice(top, top + n), slice(left, left + n)


def masker(n: int, fill: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [B, C, H, W] → x`` with its n×n centre patch set to ``fill [C]`` in every image (n = 0: unchanged)."""

    def mask(x: torch.Tensor) -> torch.Tensor:
        if n == 0:
            return x
        rows, cols = centre_patch(n, *x.shape[-2:])
        out = x.clone()
        out[..., rows, cols] = fill.to(x)[:, None, None]
        return out

    return mask


def black(config: TrainConfig) -> torch.Tensor:
    """The zero pixel of the [0, 1] image in the model's input space ``[3]`` (0, unless standardised)."""
    return to_inputs(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), config.normalize)[0, :, 0, 0]


def total_difference(clean: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``D = Σ|clean − masked| / A`` over the last three dims ``[C, H, W]`` (A = C·H·W): ``[..., B]``, float64."""
    return (clean.double() - masked.double()).abs().flatten(-3).mean(-1)


class BlockStates(NamedTuple):
    """A block's states in one block-by-block run."""

    name: str
    times: torch.Tensor  # [K]
    states: torch.Tensor  # [K, B, C, H, W]: h(t) at each time
    nfe: int  # ODE function evaluations of the solve (0 for a residual block)


@torch.no_grad()
def block_states(model: Classifier, x: torch.Tensor, points: int) -> list[BlockStates]:
    """Each block's h(t) for inputs ``x``, block by block: an ODE block on ``points`` even
    times over [0, T], a residual block at its input (t = 0) and output (t = 1); block k's
    input is block k−1's last state through the downsampling, so the chain is the forward."""
    h = model.stem(x)
    blocks = []
    for name, stage, down in (("stage1", model.stage1, model.down1), ("stage2", model.stage2, model.down2),
                              ("stage3", model.stage3, None)):
        if isinstance(stage, ODEBlock):
            times = torch.linspace(0.0, stage.T, points, dtype=h.dtype, device=h.device)
            states, nfe = stage.trajectory(h, times), stage.nfe_forward
        else:
            times = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
            states, nfe = torch.stack([h, stage(h)]), 0
        blocks.append(BlockStates(name, times, states, nfe))
        if down is not None:
            h = down(states[-1])
    return blocks


# -- the experiment --------------------------------------------------------------------------

def _settings(exp: Experiment, args: argparse.Namespace) -> dict:
    """The run's settings, checked before anything is trained or loaded."""
    defaults = QUICK if exp.quick else DEFAULTS
    size = min(exp.data.test_images.shape[-2:])
    masks = sorted(set(args.masks or defaults["masks"]))
    for n in masks:
        if not 1 <= n <= size:
            raise ValueError(f"--masks must be in 1..{size} (the side of the {size}×{size} images; larger than "
                             f"the image is not a centre patch), got {n}")
    times = args.times if args.times is not None else defaults["times"]
    if not 2 <= times <= MAX_TIMES:
        raise ValueError(f"--times (points of the time grid of each block) must be in 2..{MAX_TIMES}, got {times}")
    available = exp.test_set(studied=True)[1].numel()
    images = args.images if args.images is not None else min(defaults["images"], available)
    if not 1 <= images <= available:
        raise ValueError(f"--images must be in 1..{available} (the test images evaluated), got {images}")
    return {"masks": masks, "times": times, "images": images}


def _differences(model: Classifier, config: TrainConfig, images: torch.Tensor, masks: list[int],
                 points: int) -> tuple[list[dict], dict]:
    """D(t) of the uint8 ``images`` for every mask and block, and the feature maps of image 0.

    Returns the records ``{"mask", "block", "A", "times", "mean", "std", "nfe_clean",
    "nfe_masked"}`` (mean ± std over the images; NFE of one solve, mean over the batches)
    and ``{block: (clean, masked, difference)}``: image 0's channel means of |h(T)| and
    |h(T) − h_masked(T)| ``[H, W]`` at the largest mask.
    """
    device = next(model.parameters()).device
    fill = black(config)
    d: dict = {}  # (mask, block) → per-batch D [K, B], NFEs, times, A
    maps: dict = {}
    batch = trajectory_batch(points)
    for start in range(0, images.shape[0], batch):
        x = to_inputs(images[start : start + batch].to(device), config.normalize)
        clean = block_states(model, x, points)
        for n in masks:
            masked = block_states(model, masker(n, fill)(x), points)
            for c, m in zip(clean, masked):
                entry = d.setdefault((n, c.name), {"times": c.times.tolist(), "A": c.states[0, 0].numel(),
                                                   "D": [], "nfe_clean": [], "nfe_masked": []})
                entry["D"].append(total_difference(c.states, m.states).cpu())
                entry["nfe_clean"].append(c.nfe)
                entry["nfe_masked"].append(m.nfe)
                if start == 0 and n == masks[-1]:
                    hc, hm = c.states[-1, 0], m.states[-1, 0]
                    maps[c.name] = tuple(h.cpu() for h in (hc.abs().mean(0), hm.abs().mean(0),
                                                           (hc - hm).abs().mean(0)))
    records = []
    for (n, block), entry in d.items():
        values = torch.cat(entry["D"], dim=1)  # [K, images]
        std = values.std(1) if values.shape[1] > 1 else torch.zeros(values.shape[0], dtype=values.dtype)
        records.append({"mask": n, "block": block, "A": entry["A"], "times": entry["times"],
                        "mean": values.mean(1).tolist(), "std": std.tolist(),
                        "nfe_clean": sum(entry["nfe_clean"]) / len(entry["nfe_clean"]),
                        "nfe_masked": sum(entry["nfe_masked"]) / len(entry["nfe_masked"])})
    return records, maps


def run(exp: Experiment, args: argparse.Namespace) -> dict:
    settings = _settings(exp, args)
    masks, points = settings["masks"], settings["times"]
    defaults = QUICK if exp.quick else DEFAULTS
    studied = exp.studied(args, defaults["models"], tuple(MODELS), "with three stages")
    models = [(s.label, s.net, s.config) for s in studied]
    test_images, test_labels = exp.test_set(studied=True)
    chosen = torch.randperm(test_labels.numel(), generator=torch.Generator().manual_seed(0))[: settings["images"]]
    accuracy, difference, maps = [], [], {}
    for name, model, config in models:
        exp.log(f"[completion] {name}: accuracy at mask sizes 0 (none), {', '.join(map(str, masks))}")
        for n in [0, *masks]:
            result = evaluate(model, test_images, test_labels, config, transform=masker(n, black(config)),
                              progress=exp.progress)
            accuracy.append({"model": name, "mask": n, "acc": result["acc"], "loss": result["loss"],
                             "nfe_forward": result["nfe_forward"], "nfe_forward_mean": result["nfe_forward_mean"]})
        exp.log(f"[completion] {name}: D(t) over {settings['images']} images, {points} time points per ODE block")
        records, maps[name] = _differences(model, config, test_images[chosen], masks, points)
        difference += [{"model": name, **r} for r in records]
    names = [name for name, _, _ in models]
    first = test_images[chosen[0]].float() / 255
    _plot_accuracy(exp, accuracy, names)
    _plot_difference(exp, difference, names, masks)
    _plot_maps(exp, first, masker(masks[-1], torch.zeros(3))(first[None])[0], maps, masks[-1])
    exp.log("[completion] test accuracy (%) against the mask size:")
    exp.log("| model | " + " | ".join(f"n = {n}" for n in [0, *masks]) + " |")
    for name in names:
        exp.log(f"| {name} | " + " | ".join(f"{100 * a['acc']:.1f}" for a in accuracy if a["model"] == name) + " |")
    return {"models": names, "masks": masks, "times": points, "images": settings["images"],
            "test_images": test_labels.numel(), "image_indices": chosen.tolist(),
            "accuracy": accuracy, "difference": difference}


# -- figures ---------------------------------------------------------------------------------

def _plot_accuracy(exp: Experiment, accuracy: list[dict], names: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, name in enumerate(names):
        mine = [a for a in accuracy if a["model"] == name]
        # Markers shrinking from model to model keep lines that coincide (as at --quick's chance level) visible.
        ax.plot([a["mask"] for a in mine], [100 * a["acc"] for a in mine], marker="osD^v"[i % 5],
                markersize=max(9 - 2 * i, 3), linestyle=("-", "--", ":")[i % 3], color=f"C{i}", label=name)
    ax.set_xlabel("side n of the zeroed centre patch (0: none)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Pattern completion: accuracy" + exp.quick_note, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    exp.figure(fig, "completion_accuracy")


def _plot_difference(exp: Experiment, difference: list[dict], names: list[str], masks: list[int]) -> None:
    plt = pyplot()
    blocks = sorted({d["block"] for d in difference})
    fig, axes = plt.subplots(len(blocks), len(masks), figsize=(2.6 * len(masks) + 0.6, 2.1 * len(blocks)),
                             squeeze=False, sharex=True)
    for row, block in enumerate(blocks):
        for col, n in enumerate(masks):
            ax = axes[row][col]
            for i, name in enumerate(names):
                d = next(e for e in difference if e["model"] == name and e["mask"] == n and e["block"] == block)
                t, mean, std = (torch.tensor(d[k]) for k in ("times", "mean", "std"))
                if len(t) == 2:  # a residual block: its input and output only
                    ax.errorbar(t, mean, yerr=std, marker="s", linestyle="--", capsize=3, color=f"C{i}", label=name)
                else:
                    ax.plot(t, mean, color=f"C{i}", label=name)
                    ax.fill_between(t, mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(f"mask {n}×{n}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{block}: D(t)", fontsize=8)
            if row == len(blocks) - 1:
                ax.set_xlabel("t", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Total difference D(t) = Σ|h(t) − h_masked(t)| / A per block, mean ± std over images"
                 + ("\n" + exp.quick_note.strip() if exp.quick else ""), fontsize=9)
    exp.figure(fig, "completion_difference")


def _plot_maps(exp: Experiment, image: torch.Tensor, masked: torch.Tensor, maps: dict, n: int) -> None:
    """One row per model: the [0, 1] image, its masked version, and per block the clean and
    masked |h(T)| (one colour scale) and their difference (its own scale)."""
    plt = pyplot()
    names = list(maps)
    blocks = list(maps[names[0]])
    titles = ["input", f"masked {n}×{n}"] + [f"{b} {what}" for b in blocks for what in ("clean", "masked", "|diff|")]
    fig, axes = plt.subplots(len(names), len(titles), figsize=(1.05 * len(titles), 1.25 * len(names) + 0.3),
                             squeeze=False)
    for row, name in enumerate(names):
        panels = [(image.permute(1, 2, 0), {}), (masked.permute(1, 2, 0), {})]
        for clean, masked_map, diff in (maps[name][b] for b in blocks):
            scale = {"cmap": "viridis", "vmin": 0, "vmax": float(torch.maximum(clean.max(), masked_map.max()))}
            panels += [(clean, scale), (masked_map, scale), (diff, {"cmap": "magma", "vmin": 0})]
        for col, (ax, (panel, style)) in enumerate(zip(axes[row], panels)):
            ax.imshow(panel.numpy(), **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=6)
        axes[row][0].set_ylabel(name, fontsize=7)
    fig.suptitle("Feature maps at T: channel mean of |h(T)|, clean and masked, and of |h(T) − h_masked(T)|"
                 + exp.quick_note, fontsize=8)
    exp.figure(fig, "completion_maps")
