"""Training and evaluation of the paper's models on CIFAR-10 (paper A.2).

SGD with momentum 0.9, batch 128, lr 0.1 divided by 10 at 40 % and 70 % of the
epochs (epochs 40 and 70 of 100; σ^ji: at 80 %, 140 % and 200 %, the official
script's epochs 80, 140 and 200 of 100), random ±4 px translation and
horizontal flip, inputs in [0, 1] as the official code feeds them
(``normalize=True`` standardises them instead). With ``images_per_class`` (the
small-data protocol of Table 2) the default epochs grow as the data shrinks
(:func:`default_epochs`).

Every epoch ends with an atomic checkpoint (``last.pt``; ``best.pt`` keeps the
best test accuracy) and one JSON line in ``metrics.jsonl``; ``summary.json``
closes the run (:mod:`dcn_fast.runfiles`). The data order and the
augmentation of epoch e depend only on (seed, e), so a resumed run
(:meth:`TrainConfig.from_run`) continues exactly where the run stopped. Under
``torchrun`` the run is data-parallel (:mod:`dcn_fast.distributed`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .runfiles import (CHECKPOINT_FORMAT, append_metrics, check_output_folder, load_checkpoint, save_checkpoint,
                       write_json, write_metrics)
from .data import CIFAR10, augment, load_cifar10, per_class_subset, to_inputs
from .distributed import Ranks, resolve_device, unwrap
from .functional import BACKENDS
from .models import MODELS, build
from .modules import SRFConv2d
from .checkpoint import REPLAYS
from .ode import GRADIENTS, SOLVERS, ODEBlock

__all__ = ["TrainConfig", "train", "evaluate", "evaluate_checkpoint", "load_model", "train_split", "eval_split",
           "weights_checkpoint", "autocast", "changed_settings", "shown_setting", "default_epochs", "lr_at", "lr_drops",
           "SAMPLE_DEFAULTS"]

#: ``dcn-fast train`` without ``--data-root``: a short DCN-ODE run on the shipped
#: sample (all of its 200 training images per class, two epochs at a constant lr:
#: the paper's drops would put the second at 1e-3), about 4 minutes of 2 CPU
#: cores (README, Quick start; measurements in bench/results/README.md).
SAMPLE_DEFAULTS = {"images_per_class": 200, "epochs": 2, "lr_drops": (), "batch_size": 20, "rtol": 0.1,
                   "atol": 0.1, "gradient": "backprop"}

#: Learning-rate drops (×0.1 each) as fractions of the run's epochs.
LR_DROPS = {"default": (0.4, 0.7), "dcn-sigma-ji": (0.8, 1.4, 2.0)}

# Settings whose difference from a checkpoint's is not worth reporting on resume.
_NOT_SETTINGS = ("resume", "out", "download")


@dataclass
class TrainConfig:
    """Every setting of a training run (the CLI's options; saved in each checkpoint)."""

    model: str = "dcn-ode"
    data_root: str | None = None
    images_per_class: int | None = None
    test_images_per_class: int | None = None  # evaluate on a per-class subset of the test set (None: all)
    epochs: int | None = None  # None: default_epochs(images_per_class)
    batch_size: int = 128
    lr: float = 0.1
    lr_drops: tuple[float, ...] | None = None  # ×0.1 at these fractions of the epochs (None: the model's LR_DROPS)
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    normalize: bool = False  # standardise inputs with CIFAR-10's mean/std (official code: [0, 1])
    out: str = "runs/dcn-ode"  # the CLI defaults to runs/<model>-<date>-<time>
    amp: str | None = None
    device: str | None = None
    gradient: str = "checkpoint"  # how ODE solves are differentiated (dcn_fast.ode.GRADIENTS)
    replay: str | None = None  # checkpoint only: "step" (default) or "stage" (less memory, slower)
    seminorm: bool = False  # adjoint only: step control on the state (fewer backward steps)
    solver: str | None = None  # "dcn_fast" or "torchdiffeq" (None: dcn_fast's where it covers the method)
    T: float | None = None  # end time of the ODE blocks (default: the model's, 2 for DCNs, 1 for ODE-Net)
    activation: str | None = None  # "relu" or "celu" (default: the model's)
    rtol: float = 1e-3
    atol: float = 1e-3
    backend: str = "auto"
    eval_batch_size: int = 500
    resume: bool = False  # continue from out/last.pt
    download: bool = False  # fetch CIFAR-10 into data_root (torchvision) if absent

    def __post_init__(self) -> None:
        if isinstance(self.lr_drops, list):  # from the CLI or a checkpoint: compares equal to the tuple
            self.lr_drops = tuple(self.lr_drops)

    def validate(self) -> None:
        """Raise ValueError naming the first option out of its range."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.images_per_class is not None and not 1 <= self.images_per_class <= 5000:
            raise ValueError(f"--images-per-class must be in 1..5000 (CIFAR-10 has 5000), got {self.images_per_class}")
        if self.test_images_per_class is not None and not 1 <= self.test_images_per_class <= 1000:
            raise ValueError(f"--test-images-per-class must be in 1..1000 (CIFAR-10 has 1000), "
                             f"got {self.test_images_per_class}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in 0..2**32-1, got {self.seed}")
        for name, low, high in (("lr", 0.0, math.inf), ("rtol", 0.0, math.inf), ("atol", 0.0, math.inf)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low < value < high):
                raise ValueError(f"{_option(name)} must be a finite number > 0, got {value}")
        if self.lr_drops is not None and not (
            isinstance(self.lr_drops, tuple)
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0
                    for f in self.lr_drops)
        ):
            shown = list(self.lr_drops) if isinstance(self.lr_drops, tuple) else repr(self.lr_drops)
            raise ValueError(f"--lr-drops must be fractions of the epochs > 0, got {shown}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"--amp must be bf16 or fp16, got {self.amp!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"--gradient must be one of {', '.join(GRADIENTS)}, got {self.gradient!r}")
        if self.replay is not None and (self.gradient != "checkpoint" or self.replay not in REPLAYS):
            raise ValueError(f"--replay must be one of {', '.join(REPLAYS)} and needs --gradient checkpoint, "
                             f"got --replay {self.replay} with --gradient {self.gradient}")
        if self.seminorm and self.gradient != "adjoint":
            raise ValueError(f"--seminorm applies to --gradient adjoint only, got --gradient {self.gradient}")
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.T is not None and not (math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"--T must be a finite number > 0, got {self.T}")
        if self.T is not None and MODELS[self.model].stage != "ode":
            raise ValueError(f"--T sets the end time of ODE blocks; {self.model} has none")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check_output_folder(self.out)

    @classmethod
    def from_run(cls, out: str, **overrides) -> TrainConfig:
        """The settings of the run saved in ``out/last.pt``, with ``overrides`` (``resume=True``).

        Raises:
            ValueError: the checkpoint is unreadable.
            FileNotFoundError: ``out`` holds no checkpoint.
        """
        saved = _saved_config(load_checkpoint(Path(out) / "last.pt"))
        return replace(saved, **{**overrides, "out": str(out), "resume": True})


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _saved_config(ckpt: dict) -> TrainConfig:
    """The TrainConfig a checkpoint was written with (settings it predates keep their defaults)."""
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    return replace(config, epochs=config.epochs or ckpt["epochs"])


def default_epochs(images_per_class: int | None) -> int:
    """100 epochs on the full set; ×10 / ×5 / ×2 at ≤ 52 / ≤ 103 / ≤ 512 images per class (Table 2)."""
    if images_per_class is None or images_per_class > 512:
        return 100
    if images_per_class <= 52:
        return 1000
    if images_per_class <= 103:
        return 500
    return 200


def lr_at(config: TrainConfig, epoch: int, epochs: int, drops: tuple[float, ...] | None = None) -> float:
    """Learning rate of (0-based) ``epoch`` of ``epochs``: ×0.1 at each fraction of ``drops``
    (default: ``config.lr_drops``, else the model's :data:`LR_DROPS`, epochs 40 and 70 of 100;
    σ^ji 80, 140, 200 of 100), never at epoch 0; ``()`` keeps ``config.lr`` throughout."""
    if drops is None:
        drops = lr_drops(config)
    # + 1e-9: a fraction's product that rounds below an integer (0.57 × 100 = 56.999…) is that integer.
    return config.lr * 0.1 ** sum(epoch >= max(1, int(epochs * f + 1e-9)) for f in drops)


def lr_drops(config: TrainConfig) -> tuple[float, ...]:
    """The fractions of the epochs at which ``config``'s lr drops ×0.1: its own, else the model's."""
    if config.lr_drops is not None:
        return tuple(config.lr_drops)
    return LR_DROPS.get(config.model, LR_DROPS["default"])


def autocast(config: TrainConfig, device: torch.device):
    """The autocast context of ``config.amp`` on ``device`` (a no-op context without ``--amp``)."""
    if config.amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _build_model(config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return build(
        config.model,
        backend=config.backend,
        rtol=config.rtol,
        atol=config.atol,
        gradient=config.gradient,
        replay=config.replay,
        solver=config.solver,
        adjoint_options={"norm": "seminorm"} if config.seminorm else None,
        T=config.T,
        activation=config.activation,
    )


def _load_weights(model: torch.nn.Module, state: dict, path: Path, model_name: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"the weights in {path} do not fit model {model_name!r} ({detail[:300]})") from exc


class _SolverWatch:
    """Names the ODE block whose solve failed: torchdiffeq stops a solve whose step
    size underflows with a bare ``AssertionError`` (dcn_fast's solver with a
    ``RuntimeError`` that does not know the block); this turns either into an error
    that says which block and why it probably happened."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.last = model, None
        for name, block in model.named_modules():
            if isinstance(block, ODEBlock):
                # The ODE function runs in the forward solve and in the adjoint's backward solve.
                block.func.register_forward_pre_hook(partial(self._entered, name))

    def _entered(self, name: str, module, args) -> None:
        self.last = name

    @contextmanager
    def watch(self, where: str):
        try:
            yield
        except (AssertionError, RuntimeError) as exc:
            if "underflow" not in str(exc) or self.last is None:
                raise
            block = self.model.get_submodule(self.last)
            if not all(bool(torch.isfinite(p).all()) for p in block.parameters()):
                cause = "its weights are not finite (the run diverged: try a lower --lr)"
            else:
                cause = "its weights are finite, so the tolerance is probably too tight for the dtype (raise --rtol/--atol)"
            raise FloatingPointError(f"the ODE solver's step size underflowed in ODE block {self.last!r} {where}: {cause}") from exc


def _prepare_cpu_kernel(model: torch.nn.Module, config: TrainConfig, device: torch.device, log) -> None:
    """Build or load the C++ kernel up front, saying so: a first build takes up to a minute or two."""
    if device.type != "cpu" or config.backend not in ("auto", "cpu"):
        return
    if not any(isinstance(m, SRFConv2d) for m in model.modules()):
        return
    from . import ops

    log("loading the C++ CPU kernel (compiled on first use: about 15 s to 1.5 min; then cached)")
    started = time.perf_counter()
    ready = ops.cpu_kernel_available()
    log(f"C++ CPU kernel {'ready' if ready else 'unavailable: ' + str(ops.kernel_error('cpu'))} "
        f"({time.perf_counter() - started:.0f} s)")


@torch.no_grad()
def _evaluate(model, images, labels, config, device, ranks: Ranks, watch: _SolverWatch, progress: bool,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Loss, accuracy and forward NFE over ``images`` (sharded over ``ranks``).

    ``transform`` maps each batch of model inputs before the forward pass (a
    mask, a contrast change). NFE, summed over the ODE blocks: the largest of
    any batch (``nfe_forward``) and the mean per batch (``nfe_forward_mean``).
    """
    from tqdm.auto import tqdm

    model.eval()
    loss_sum, correct, count, nfe, nfe_sum, batches = 0.0, 0.0, 0.0, 0, 0.0, 0.0
    shard = torch.arange(ranks.rank, images.shape[0], ranks.world)
    blocks = unwrap(model).ode_blocks()
    starts = range(0, shard.numel(), config.eval_batch_size)
    for start in tqdm(starts, desc="test", disable=not (progress and ranks.main), leave=False, dynamic_ncols=True):
        idx = shard[start : start + config.eval_batch_size]
        x = to_inputs(images[idx].to(device), config.normalize)
        if transform is not None:
            x = transform(x)
        y = labels[idx].to(device)
        with autocast(config, device), watch.watch("while evaluating"):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        count += idx.numel()
        batch_nfe = sum(b.nfe_forward for b in blocks)
        nfe, nfe_sum, batches = max(nfe, batch_nfe), nfe_sum + batch_nfe, batches + 1
    loss_sum, correct, count, nfe_sum, batches = ranks.sum([loss_sum, correct, count, nfe_sum, batches], device)
    model.train()
    return {"loss": loss_sum / count, "acc": correct / count, "nfe_forward": nfe,
            "nfe_forward_mean": nfe_sum / max(batches, 1)}


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, *,
             device: torch.device | None = None, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             progress: bool = False) -> dict:
    """Test loss, accuracy and NFE of ``model`` on uint8 ``images``, fed as ``config`` says
    (``normalize``, ``eval_batch_size``, ``amp``), each batch passed through ``transform`` first.

    Returns ``{"loss", "acc", "nfe_forward" (largest per batch), "nfe_forward_mean"}``.
    """
    device = device or next(model.parameters()).device
    return _evaluate(model, images, labels, config, device, Ranks(device), _SolverWatch(model), progress, transform)


def train_split(data: CIFAR10, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of a run: all, or ``config.images_per_class`` of each
    class drawn with ``config.seed`` (the small-data protocol of Table 2)."""
    if config.images_per_class is None:
        return data.train_images, data.train_labels
    idx = per_class_subset(data.train_labels, config.images_per_class, config.seed)
    return data.train_images[idx], data.train_labels[idx]


def eval_split(data: CIFAR10, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels a run evaluates on: all, or ``config.test_images_per_class``
    of each class (the same subset for every seed, so runs compare on the same images)."""
    if config.test_images_per_class is None:
        return data.test_images, data.test_labels
    fewest = int(data.test_labels.bincount().min())
    if config.test_images_per_class > fewest:
        raise ValueError(f"--test-images-per-class must be in 1..{fewest} (the test images per class in "
                         f"{data.source}), got {config.test_images_per_class}")
    idx = per_class_subset(data.test_labels, config.test_images_per_class, seed=0)
    return data.test_images[idx], data.test_labels[idx]


@dataclass
class _Run:
    """What one training process holds: settings, data, model, optimizer, progress so far."""

    config: TrainConfig
    epochs: int
    device: torch.device
    ranks: Ranks
    data: CIFAR10
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32] on the device
    train_labels: torch.Tensor  # int64 [N] on the device
    test: tuple[torch.Tensor, torch.Tensor]  # the test images and labels evaluated each epoch (eval_split)
    model: torch.nn.Module
    net: torch.nn.Module  # the model, under DDP in a torchrun launch
    optimizer: torch.optim.Optimizer
    watch: _SolverWatch
    out: Path
    start_epoch: int = 0
    best: dict | None = None
    history: list | None = None

    @property
    def steps(self) -> int:
        return math.ceil(self.train_images.shape[0] / self.config.batch_size)


def _train_epoch(run: _Run, epoch: int, progress: bool) -> dict:
    """One pass over the training set; the epoch's mean loss, accuracy and last NFEs.

    Raises FloatingPointError on a non-finite loss, before the step that would apply it.
    """
    from tqdm.auto import tqdm

    config, ranks, device = run.config, run.ranks, run.device
    blocks = run.model.ode_blocks()
    gen = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(run.train_images.shape[0], generator=gen, device=device)
    loss_sum = correct = count = 0.0
    nfe_f = nfe_b = 0
    bar = tqdm(range(run.steps), desc=f"epoch {epoch + 1}/{run.epochs}", disable=not (progress and ranks.main),
               leave=False, dynamic_ncols=True)
    for step in bar:
        batch = order[step * config.batch_size : (step + 1) * config.batch_size]
        # The augmentation is drawn for the whole global batch, then sharded,
        # so a data-parallel run sees exactly the single-process batches.
        x = to_inputs(augment(run.train_images[batch], gen), config.normalize)[ranks.rank :: ranks.world]
        y = run.train_labels[batch][ranks.rank :: ranks.world]
        try:
            with autocast(config, device), run.watch.watch(f"at epoch {epoch + 1}, step {step + 1} (forward)"):
                logits = run.net(x)
        except ValueError as exc:  # weights driven out of range (e.g. a σ past its bounds) by the last update
            raise FloatingPointError(f"at epoch {epoch + 1}, step {step + 1} of {run.steps}: {exc} "
                                     "(the weights have probably diverged: try a lower --lr)") from exc
        loss = F.cross_entropy(logits.float(), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            kept = (f"the last good checkpoint, {run.out / 'last.pt'}, holds epoch {epoch}" if epoch > 0
                    else "no checkpoint was written")
            raise FloatingPointError(
                f"training loss is {value} at epoch {epoch + 1}, step {step + 1} of {run.steps}: stopped; {kept} "
                "(try a lower --lr, or check --weight-decay and the data)"
            )
        run.optimizer.zero_grad(set_to_none=True)
        # Mean over the global batch: DDP averages the shard means.
        with run.watch.watch(f"at epoch {epoch + 1}, step {step + 1} (backward)"):
            loss.backward()
        run.optimizer.step()
        nfe_f = sum(b.nfe_forward for b in blocks)
        nfe_b = sum(b.count_backward() for b in blocks)
        loss_sum += value * y.numel()
        correct += float((logits.detach().argmax(1) == y).sum())
        count += y.numel()
        bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}", nfe=f"{nfe_f}/{nfe_b}")
    bar.close()
    loss_sum, correct, count = ranks.sum([loss_sum, correct, count], device)
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "nfe_forward": nfe_f, "nfe_backward": nfe_b}


def _checkpoint_state(run: _Run, epoch: int) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(run.config),
        "epoch": epoch,
        "epochs": run.epochs,
        "model_state": run.model.state_dict(),
        "optimizer_state": run.optimizer.state_dict(),
        "best": run.best,
        "history": run.history,
    }


def _summary(config: TrainConfig, epochs: int, history: list, best: dict, parameters: int, n_train: int,
             source: str, out: Path) -> dict:
    return {
        "model": config.model,
        "parameters": parameters,
        "gradient": config.gradient,  # how the ODE solves were differentiated
        "replay": (config.replay or "step") if config.gradient == "checkpoint" else None,
        "solver": config.solver or "dcn_fast",
        "epochs": epochs,
        "epochs_done": len(history),
        "train_images": n_train,
        "data": source,
        "best_test_acc": best["acc"],
        "best_epoch": best["epoch"],
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "out": str(out.resolve()),
        "checkpoint": str((out / "best.pt").resolve()),
    }


def shown_setting(value) -> str:
    """A setting's value as its option takes it: ``(0.4, 0.7)`` as ``0.4 0.7``, ``()`` as ``(none)``."""
    if isinstance(value, tuple):
        return " ".join(f"{x:g}" for x in value) or "(none)"
    return str(value)


def changed_settings(saved: TrainConfig, config: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """The settings in which ``config`` differs from ``saved``, as ``--option old -> new``
    (where the run is written and how it was started aside, and the names in ``ignore``)."""
    # Compared as they act: the default epochs and lr drops as numbers.
    effective = lambda c: replace(c, epochs=c.epochs or default_epochs(c.images_per_class),  # noqa: E731
                                  lr_drops=lr_drops(c))
    saved, config = effective(saved), effective(config)
    return [f"{_option(f.name)} {shown_setting(getattr(saved, f.name))} -> {shown_setting(getattr(config, f.name))}"
            for f in fields(TrainConfig)
            if f.name not in _NOT_SETTINGS + ignore and getattr(saved, f.name) != getattr(config, f.name)]


def _resume_point(config: TrainConfig, out: Path, log, main: bool) -> dict | None:
    """The checkpoint to continue from (``None`` for a new run); reports changed settings."""
    if not config.resume:
        if (out / "last.pt").exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    ckpt = load_checkpoint(out / "last.pt")
    saved = _saved_config(ckpt)
    if saved.model != config.model:
        raise ValueError(f"checkpoint {out / 'last.pt'} holds model {saved.model!r}, not {config.model!r}; "
                         "pass --model accordingly or choose another --out")
    changed = changed_settings(saved, config)
    if changed and main:
        log(f"resuming with changed settings: {', '.join(changed)}")
    return ckpt


def _setup(config: TrainConfig, ckpt: dict | None, device: torch.device, ranks: Ranks) -> _Run:
    """Data, model and optimizer of the run, restored from ``ckpt`` when resuming."""
    data = load_cifar10(config.data_root, download=config.download)
    images, labels = train_split(data, config)
    model = _build_model(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    run = _Run(config=config, epochs=config.epochs, device=device, ranks=ranks, data=data,
               train_images=images.to(device), train_labels=labels.to(device), test=eval_split(data, config),
               model=model,
               net=ranks.wrap(model, device), optimizer=optimizer, watch=_SolverWatch(model), out=Path(config.out),
               best={"acc": -1.0, "epoch": -1}, history=[])
    if ckpt is not None:
        _load_weights(model, ckpt["model_state"], run.out / "last.pt", config.model)
        optimizer.load_state_dict(ckpt["optimizer_state"])
        run.start_epoch, run.best, run.history = ckpt["epoch"], ckpt["best"], list(ckpt["history"])
    return run


def train(config: TrainConfig, progress: bool = True, log=print) -> dict:
    """Train ``config.model``; returns the summary (also written to ``out/summary.json``).

    With ``config.resume``, continues from ``out/last.pt`` with the settings of
    ``config`` (those that differ from the checkpoint's are logged); use
    :meth:`TrainConfig.from_run` to continue with the saved settings. A run
    that has already reached its epochs trains nothing and returns its summary.

    Raises:
        ValueError: a setting out of range, unreadable data or checkpoint.
        FileNotFoundError, FileExistsError: no data / no run to resume, or a run already in ``out``.
        FloatingPointError: a non-finite loss or an ODE solve that failed (the
            message names the epoch, step or block); the last checkpoint stays.
    """
    config.validate()
    config = replace(config, epochs=config.epochs or default_epochs(config.images_per_class))
    device = resolve_device(config.device)
    if config.backend == "triton" and device.type != "cuda":
        raise ValueError(f"--backend triton runs on CUDA devices only, got --device {device}")
    ranks = Ranks(device)
    try:
        out = Path(config.out)
        ckpt = _resume_point(config, out, log, ranks.main)
        run = _setup(config, ckpt, device, ranks)
        if ranks.main and ckpt is not None:
            # The checkpoint is the record: a kill after it was written but before its
            # metrics line was appended would otherwise lose that line for good.
            write_metrics(run.history, out / "metrics.jsonl")
        n_train = run.train_images.shape[0]
        if run.start_epoch >= run.epochs:
            if ranks.main:
                log(f"the run in {out} has finished ({run.start_epoch} of {run.epochs} epochs); nothing to train "
                    "(pass --epochs to train longer)")
        elif ranks.main:
            if ckpt is not None:
                log(f"resuming {config.model} from {out / 'last.pt'} after epoch {run.start_epoch}")
            log(
                f"training {config.model} ({run.model.num_parameters():,} parameters) on {n_train} images from "
                f"{run.data.source}, {_count(run.epochs, 'epoch')} of {_count(run.steps, 'step')}, "
                f"batch {config.batch_size}, {device}" + (f", {ranks.world} processes" if ranks.active else "")
            )
        if run.start_epoch < run.epochs:
            _prepare_cpu_kernel(run.model, config, device, log if ranks.main else (lambda *_: None))
        for epoch in range(run.start_epoch, run.epochs):
            _run_epoch(run, epoch, progress, log)
        summary = _summary(config, run.epochs, run.history, run.best, run.model.num_parameters(), n_train,
                           run.data.source, out)
        if ranks.main:
            write_json(summary, out / "summary.json")
        # A clean end for a launch: DDP's reducer (in run) holds the process group, so it goes
        # first, and every rank is past its last collective before the group is destroyed (one
        # rank of a 2-process CPU run once aborted at exit: "terminate called without an
        # active exception", a known hazard of gloo's threads at teardown).
        del run
        ranks.barrier()
        return summary
    finally:
        ranks.close()


def _run_epoch(run: _Run, epoch: int, progress: bool, log) -> None:
    """Train, evaluate, checkpoint and record one epoch."""
    lr = lr_at(run.config, epoch, run.epochs)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    started = time.perf_counter()
    trained = _train_epoch(run, epoch, progress)
    test = _evaluate(run.net, *run.test, run.config, run.device, run.ranks, run.watch, progress)
    record = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": trained["train_loss"],
        "train_acc": trained["train_acc"],
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        "nfe_forward": trained["nfe_forward"],
        "nfe_backward": trained["nfe_backward"],
        "seconds": time.perf_counter() - started,
    }
    run.history.append(record)
    is_best = test["acc"] > run.best["acc"]
    if is_best:
        run.best = {"acc": test["acc"], "epoch": epoch + 1}
    if not run.ranks.main:
        return
    state = _checkpoint_state(run, epoch + 1)
    # The folder comes with the first checkpoint: bad settings or data, or a run that
    # stops within its first epoch, leave none behind.
    run.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, run.out / "last.pt")
    if is_best:
        save_checkpoint(state, run.out / "best.pt")
    append_metrics(record, run.out / "metrics.jsonl")
    log(
        f"epoch {epoch + 1}/{run.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
        f" | test loss {record['test_loss']:.4f} acc {record['test_acc']:.4f}"
        f" | NFE {record['nfe_forward']}/{record['nfe_backward']} | {record['seconds']:.1f}s"
    )


def load_model(path: str | Path, device: str | torch.device | None = None,
               models: tuple[str, ...] | None = None) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """The model of a checkpoint written by :func:`train`, its weights loaded, in eval mode.

    Returns ``(model, config, checkpoint)``. ``models``: the model names the
    caller accepts; a checkpoint of any other model raises ValueError.
    """
    ckpt = load_checkpoint(path)
    config = _saved_config(ckpt)
    if models is not None and config.model not in models:
        raise ValueError(f"checkpoint {path} holds model {config.model!r}; this needs one of: {', '.join(models)}")
    model = _build_model(config).to(resolve_device(device))
    _load_weights(model, ckpt["model_state"], Path(path), config.model)
    return model.eval(), config, ckpt


def weights_checkpoint(state: dict, config: TrainConfig) -> dict:
    """A checkpoint of weights trained elsewhere (no optimizer, no history, epoch 0) that
    :func:`load_model`, ``dcn-fast eval`` and the experiments' ``--checkpoint`` read like a run's."""
    return {"format": CHECKPOINT_FORMAT, "config": asdict(config), "epoch": 0, "epochs": config.epochs or 0,
            "model_state": state, "optimizer_state": {}, "best": None, "history": []}


def evaluate_checkpoint(path: str, data_root: str | None = None, device: str | None = None,
                        batch_size: int = 500, progress: bool = False) -> dict:
    """Test accuracy of a checkpoint written by :func:`train`, with the inputs it was trained on
    (on the whole test set of ``data_root``, default the run's own)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    model, config, ckpt = load_model(path, device)
    config = replace(config, eval_batch_size=batch_size)
    data = load_cifar10(data_root if data_root is not None else config.data_root)
    result = evaluate(model, data.test_images, data.test_labels, config, progress=progress)
    return {"model": config.model, "epoch": ckpt["epoch"], "test_acc": result["acc"], "test_loss": result["loss"],
            "nfe_forward": result["nfe_forward"], "data": data.source}
