"""Reconstruction (Table 3, Fig. A.1): test MSE of a decoder trained on a frozen classifier's stage-3 features.

The encoder is a trained classifier up to the end of stage 3 (``--checkpoint``,
or trained first under ``OUT/runs/<model>``), ``[B, 128, 7, 7]`` from a 32×32
image, frozen. The decoder, as in the official ``reconstruct_*.py`` scripts:
bilinear ×2, a stage-3 block (128 channels, 14×14), bilinear ×2, a 1×1 conv
128→64, a stage-2 block (64 channels, 28×28), GroupNorm, CELU, a 1×1 conv
64→3. Its two blocks are of the encoder's own kind (SRF ODE blocks for DCNs,
3×3 ODE blocks for ODE-Net, residual blocks for ResNets) and start from the
classifier's trained stage-3 and stage-2 weights. Its output is rescaled to
[0, 1] over the batch (minus the batch minimum, divided by the maximum) and
compared by MSE with the central 28×28 of the input. SGD momentum 0.9, batch
128, lr 0.1, ×0.1 at 50 % and 80 % of 50 epochs, ±4 px translation and flips;
the test MSE of every epoch (test batches of 1000) is recorded and the best
reported. Decoders are kept under ``OUT/decoders/<model>`` (``last.pt`` after
every epoch, so a rerun resumes; ``best.pt``).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment, to_inputs
from ..distributed import resolve_device
from ..models import MODELS, Classifier, build
from ..ode import ODEBlock, group_norm
from ..runfiles import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ..train import TrainConfig, autocast, lr_at, train_split
from .common import Experiment, add_studied_arguments, pyplot

HELP = "Table 3, Fig. A.1: test MSE of a decoder trained on a frozen classifier's features"

#: Table 3 of the paper, reconstruction loss (unit: see docs/experiments/reconstruction.md).
PAPER = {"dcn-ode": 17.1, "odenet": 20.2}

#: The models of the official reconstruct_*.py scripts.
MODELS_COMPARED = ["dcn-ode", "odenet", "resnet-blocks"]
DEFAULTS = {"decoder_epochs": 50}
#: --quick: decoders see 1 training image per class (one step per epoch; the classifiers
#: are --quick's studied ones, common.QUICK_STUDIED), so the run stays within a minute on 2 CPU cores.
QUICK = {"decoder_epochs": 2, "images_per_class": 1}

#: Learning-rate drops (×0.1) of the decoder, as fractions of its epochs (official: epochs 25 and 40 of 50).
LR_DROPS = (0.5, 0.8)
#: Test batch of the official scripts: the output is rescaled over a batch, so the batch is part of the metric.
TEST_BATCH = 1000
#: The decoder outputs 4·7 = 28 pixels a side; the target is the input without a 2-pixel border.
BORDER = 2
#: Test images shown in the figure (the first of each of the first 8 classes).
SHOWN = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every model of the paper has a stage 3 to encode with.
    add_studied_arguments(parser, tuple(MODELS), MODELS_COMPARED, "with three stages")
    parser.add_argument("--decoder-epochs", type=int, metavar="N",
                        help=f"epochs of every decoder training, 1..10000 (default: {DEFAULTS['decoder_epochs']}; "
                             f"--quick: {QUICK['decoder_epochs']}); --epochs sets the classifiers'")


class Decoder(nn.Module):
    """Stage-3 features ``[B, 128, H, W]`` → an image ``[B, 3, 4H, 4W]`` (before rescaling).

    ``block3`` works on 128 channels at 2H×2W, ``block2`` on 64 channels at 4H×4W.
    """

    def __init__(self, block3: nn.Module, block2: nn.Module) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.block3 = block3
        self.reduce = nn.Conv2d(128, 64, 1)
        self.block2 = block2
        # CELU here for every model, ReLU ones included, as in all three official scripts.
        self.head = nn.Sequential(group_norm(64), nn.CELU(), nn.Conv2d(64, 3, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.block3(self.up(features))
        h = self.block2(self.reduce(self.up(h)))
        return self.head(h)

    def ode_blocks(self) -> list[ODEBlock]:
        return [m for m in (self.block3, self.block2) if isinstance(m, ODEBlock)]


def build_decoder(encoder: Classifier, config: TrainConfig) -> Decoder:
    """A decoder whose blocks are copies of ``encoder``'s trained stage-3 and stage-2 blocks.

    The blocks are rebuilt with ``config``'s solver settings (rtol, atol, gradient,
    backend) and the encoder's own model, T and activation, then given the encoder's
    weights: the decoder trains its own copies, the encoder's stay as they are.
    (The official scripts put the classifier's very block modules into the
    decoder, so their optimizer also changed the encoder's stages 2 and 3; the
    paper describes the encoder as frozen, which is what this does.)
    """
    torch.manual_seed(config.seed)
    spec = encoder.spec
    source = build(encoder.name, backend=config.backend, rtol=config.rtol, atol=config.atol,
                   gradient=config.gradient, replay=config.replay, T=spec.T if spec.stage == "ode" else None,
                   activation=spec.activation)
    source.load_state_dict(encoder.state_dict())
    device = next(encoder.parameters()).device
    return Decoder(source.stage3, source.stage2).to(device)


def fingerprint(model: nn.Module) -> str:
    """A digest of ``model``'s weights: names the encoder a decoder was trained on, wherever
    its checkpoint lies (a run folder may be moved) and whatever file it is loaded from."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rescale(images: torch.Tensor) -> torch.Tensor:
    """The decoder's output mapped onto [0, 1] over the whole batch, as the official scripts do."""
    shifted = images - images.amin()
    return shifted / shifted.amax().clamp_min(torch.finfo(shifted.dtype).tiny)


def targets(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, 32, 32]`` → the float target in [0, 1], ``[B, 3, 28, 28]`` (the central crop)."""
    return images[..., BORDER:-BORDER, BORDER:-BORDER].float() / 255.0


@torch.no_grad()
def encode(encoder: Classifier, images: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, float | None]:
    """Stage-3 features of uint8 ``images`` (fed as ``config`` says: ``normalize``, ``amp``), in test
    batches; and the encoder's mean forward NFE per batch (``None`` without ODE blocks)."""
    device = next(encoder.parameters()).device
    features, nfe = [], []
    for start in range(0, images.shape[0], TEST_BATCH):
        with autocast(config, device):
            features.append(encoder.features(to_inputs(images[start:start + TEST_BATCH].to(device),
                                                       config.normalize)).float())
        nfe.append(sum(b.nfe_forward for b in encoder.ode_blocks()))
    return torch.cat(features), (sum(nfe) / len(nfe) if encoder.ode_blocks() else None)


@torch.no_grad()
def evaluate_decoder(decoder: Decoder, features: torch.Tensor, target: torch.Tensor, config: TrainConfig,
                     shown: torch.Tensor) -> dict:
    """Test MSE (mean over every pixel and channel) of ``decoder`` on precomputed encoder
    ``features``, in batches of :data:`TEST_BATCH`; its mean forward NFE per batch; and the
    rescaled reconstructions of the images at indices ``shown``."""
    decoder.eval()
    outputs, squared, nfe = {}, 0.0, []
    wanted = set(shown.tolist())
    for start in range(0, features.shape[0], TEST_BATCH):
        with autocast(config, features.device):
            out = rescale(decoder(features[start:start + TEST_BATCH]).float())
        squared += float((out - target[start:start + TEST_BATCH]).square().sum())
        nfe.append(sum(b.nfe_forward for b in decoder.ode_blocks()))
        outputs.update({i: out[i - start].cpu() for i in wanted if start <= i < start + out.shape[0]})
    decoder.train()
    return {"test_mse": squared / target.numel(), "nfe_forward": sum(nfe) / len(nfe) if decoder.ode_blocks() else None,
            "shown": torch.stack([outputs[i] for i in shown.tolist()])}


def train_decoder_epoch(encoder: Classifier, decoder: Decoder, optimizer: torch.optim.Optimizer,
                        images: torch.Tensor, config: TrainConfig, epoch: int) -> dict:
    """One pass of the decoder over uint8 ``images`` (augmented; the encoder without a graph);
    the mean training loss and the last step's NFE. Raises FloatingPointError on a non-finite loss."""
    device = images.device
    gen = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(images.shape[0], generator=gen, device=device)
    loss_sum, nfe_f, nfe_b = 0.0, 0, 0
    for start in range(0, images.shape[0], config.batch_size):
        batch = augment(images[order[start:start + config.batch_size]], gen)
        with torch.no_grad(), autocast(config, device):
            features = encoder.features(to_inputs(batch, config.normalize)).float()
        with autocast(config, device):
            out = decoder(features)
        loss = F.mse_loss(rescale(out.float()), targets(batch))
        value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"decoder training loss is {value} at epoch {epoch + 1}: stopped "
                                     "(try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        nfe_f = sum(b.nfe_forward for b in decoder.ode_blocks())
        nfe_b = sum(b.count_backward() for b in decoder.ode_blocks())
        loss_sum += value * batch.shape[0]
    return {"train_loss": loss_sum / images.shape[0], "nfe_forward": nfe_f, "nfe_backward": nfe_b}


def run(exp: Experiment, args: argparse.Namespace) -> dict:
    defaults = QUICK if exp.quick else DEFAULTS
    epochs = args.decoder_epochs if args.decoder_epochs is not None else defaults["decoder_epochs"]
    if not 1 <= epochs <= 10_000:
        raise ValueError(f"--decoder-epochs must be in 1..10000, got {epochs}")
    # Checked before any training: the decoder's settings, then every checkpoint (studied loads all first).
    subset = {"images_per_class": QUICK["images_per_class"]} if exp.quick else {}
    encoders = exp.studied(args, MODELS_COMPARED, tuple(MODELS), "with three stages", trains_more=True)

    device = resolve_device(exp.device)
    test_images, test_labels = exp.test_set()
    shown = torch.stack([torch.nonzero(test_labels == c)[0, 0] for c in range(SHOWN)])
    target = targets(test_images).to(device)
    rows = []
    for studied in encoders:
        encoder = studied.net.requires_grad_(False)
        # The encoder is fed as it was trained (normalize); the rest is this run's protocol.
        config = replace(exp.config(studied.model, exp.out / "decoders" / studied.key, **subset), epochs=epochs,
                         normalize=studied.config.normalize)
        config.validate()
        row = _decoder_run(exp, encoder, studied.checkpoint, config, test_images, target, shown)
        rows.append({"model": studied.model, "label": studied.label, "encoder_checkpoint": studied.checkpoint,
                     "encoder_epoch": studied.epoch, "encoder_test_acc": studied.best_acc, **row,
                     "paper": PAPER.get(studied.model)})

    train_images = train_split(exp.data, config)[0]  # what the decoders trained on
    mean_image = targets(train_images.sum(0, dtype=torch.float64) / train_images.shape[0]).to(device)
    baseline = float((target - mean_image).square().mean())
    _plot_grid(exp, targets(test_images[shown]), rows)
    _plot_curves(exp, rows)
    exp.log("[reconstruction] test MSE (per pixel and channel; best epoch), and the official scripts' printout:")
    exp.log("| model | test MSE | ×1000 | per image (sum) | official printout | paper |")
    for row in rows:
        exp.log(f"| {row['label']} | {row['test_mse']:.5f} | {row['test_mse_x1000']:.2f} | "
                f"{row['test_sse_per_image']:.2f} | {row['official_printout']:.4f} | {row['paper'] or '-'} |")
    exp.log(f"[reconstruction] predicting the mean training image: test MSE {baseline:.5f}")
    for row in rows:
        row.pop("shown")
    return {"protocol": {"decoder_epochs": epochs, "lr_drops": list(LR_DROPS), "test_batch": TEST_BATCH,
                         "target": f"central {32 - 2 * BORDER}x{32 - 2 * BORDER} crop, in [0, 1]",
                         "test_images": int(test_images.shape[0])},
            "baseline_mean_image_mse": baseline, "models": rows}


def _decoder_run(exp: Experiment, encoder: Classifier, encoder_path: str, config: TrainConfig,
                 test_images: torch.Tensor, target: torch.Tensor, shown: torch.Tensor) -> dict:
    """Train (or resume, or reuse) one decoder in ``config.out``; its record for result.json."""
    folder = Path(config.out)
    identity = {"path": encoder_path, "fingerprint": fingerprint(encoder)}
    ckpt = None
    if (folder / "last.pt").exists():
        ckpt = load_checkpoint(folder / "last.pt")
        saved = ckpt.get("encoder") or {}
        if saved.get("fingerprint") != identity["fingerprint"]:
            raise ValueError(f"{folder} holds a decoder trained on another classifier ({saved.get('path')}) than "
                             f"{encoder_path}; choose another --out")
        # Changed settings (a longer --decoder-epochs too: its learning-rate drops would move) are refused.
        config = exp.continued(config)
    device = next(encoder.parameters()).device
    decoder = build_decoder(encoder, config)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    history, best, start = [], None, 0
    if ckpt is not None:
        decoder.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        history, best, start = list(ckpt["history"]), ckpt["best"], ckpt["epoch"]
        identity["nfe_forward"] = ckpt["encoder"].get("nfe_forward")
    if start < config.epochs:
        images = train_split(exp.data, config)[0].to(device)
        # The encoder is frozen and the test set is not augmented: its features are computed once.
        features, identity["nfe_forward"] = encode(encoder, test_images, config)
        exp.log(f"[reconstruction] decoder for {encoder.name} ({sum(p.numel() for p in decoder.parameters()):,} "
                f"parameters) on {images.shape[0]} images, {config.epochs} epochs, batch {config.batch_size}, {device}")
        folder.mkdir(parents=True, exist_ok=True)
    for epoch in range(start, config.epochs):
        lr = lr_at(config, epoch, config.epochs, LR_DROPS)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        trained = train_decoder_epoch(encoder, decoder, optimizer, images, config, epoch)
        test = evaluate_decoder(decoder, features, target, config, shown)
        history.append({"epoch": epoch + 1, "lr": lr, **trained, "test_mse": test["test_mse"],
                        "test_nfe_forward": test["nfe_forward"], "seconds": time.perf_counter() - started})
        state = {"format": CHECKPOINT_FORMAT, "config": asdict(config), "epoch": epoch + 1, "epochs": config.epochs,
                 "model_state": decoder.state_dict(), "optimizer_state": optimizer.state_dict(),
                 "history": history, "encoder": identity}
        if best is None or test["test_mse"] < best["test_mse"]:
            best = {"epoch": epoch + 1, **test}
            save_checkpoint({**state, "best": best}, folder / "best.pt")
        save_checkpoint({**state, "best": best}, folder / "last.pt")
        exp.log(f"[reconstruction] {encoder.name} decoder epoch {epoch + 1}/{config.epochs}: "
                f"train loss {trained['train_loss']:.5f} | test MSE {test['test_mse']:.5f} | "
                f"NFE {trained['nfe_forward']}/{trained['nfe_backward']} | {history[-1]['seconds']:.1f}s")
    mse = best["test_mse"]
    return {
        "test_mse": mse,
        "test_mse_x1000": 1000 * mse,
        "test_sse_per_image": mse * target[0].numel(),
        # What reconstruct_*.py prints as "Test Acc": Σ(batch mean MSE) / (test images) × 10000,
        # i.e. 10 × the mean MSE with its test batches of 1000.
        "official_printout": mse * 10,
        "test_mse_final": history[-1]["test_mse"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
        "nfe_decoder": best["nfe_forward"],
        "nfe_encoder": identity["nfe_forward"],
        "decoder_checkpoint": str((folder / "best.pt").resolve()),
        "history": history,
        "shown": best["shown"],
    }


def _plot_grid(exp: Experiment, inputs: torch.Tensor, rows: list[dict]) -> None:
    """Fig. A.1: the shown test images (top row) and each model's reconstruction of them."""
    plt = pyplot()
    images = [("input", inputs)] + [(row["label"], row["shown"]) for row in rows]
    fig, axes = plt.subplots(len(images), SHOWN, figsize=(SHOWN * 1.0, len(images) * 1.05), squeeze=False)
    for r, (name, batch) in enumerate(images):
        for c in range(SHOWN):
            ax = axes[r, c]
            ax.imshow(batch[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Reconstructions from frozen stage-3 features" + exp.quick_note, fontsize=9)
    fig.tight_layout()
    exp.figure(fig, "reconstructions")


def _plot_curves(exp: Experiment, rows: list[dict]) -> None:
    """Decoder training loss and test MSE against the epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(rows):
        epochs = [h["epoch"] for h in row["history"]]
        ax.plot(epochs, [h["train_loss"] for h in row["history"]], linestyle="--", marker=".", color=f"C{i}",
                label=f"{row['label']} train")
        ax.plot(epochs, [h["test_mse"] for h in row["history"]], marker="o", color=f"C{i}",
                label=f"{row['label']} test")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder epoch")
    ax.set_ylabel("MSE per pixel and channel")
    ax.set_title("Decoder training" + exp.quick_note)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    exp.figure(fig, "decoder_curves")
